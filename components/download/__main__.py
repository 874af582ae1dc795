"""``python -m components.download``: the step's command line (components/download/component.py)."""
from components.download.component import main

if __name__ == "__main__":
    main()
