"""``python -m components.download``: the step's command line (components/download/component.py)."""
from components.download.component import main

if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.download"))
