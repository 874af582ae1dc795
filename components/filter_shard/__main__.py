"""``python -m components.filter_shard``: the step's command line (components/filter_shard/component.py)."""
from components.filter_shard.component import main

if __name__ == "__main__":
    import sys

    from components.cli_errors import run_main

    sys.exit(run_main(main, "python -m components.filter_shard"))
