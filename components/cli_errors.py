"""How a step's command line (``python -m components.<step>``) ends on bad input.

An input error the step raises on purpose (a ValueError naming the input: a bad
artifact, URL list, eval set, option or config; a missing file) is the user's to fix,
not a crash: one line ``<prog>: error: <message>`` on stderr and exit status 2, as
argparse does for bad flags. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

# ValueError covers ArtifactError, ConfigError, UrlListError, EvalDataError.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def run_main(main: Callable[[list[str] | None], object], prog: str,
             argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; an input error becomes one line on stderr and status 2.

    Returns:
        The exit status: 0, or 2 after an input error.
    """
    try:
        main(argv)
    except INPUT_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
