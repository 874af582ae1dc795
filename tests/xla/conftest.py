"""The XLA lane: these tests run only in the torch_xla environment (``make test-xla``).

In the main environment (no torch_xla) pytest does not collect them at all.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("torch_xla") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("PJRT_DEVICE", "CPU")  # a CPU stands in for the TPU
    ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if ROOT not in sys.path:  # the repo is not installed in the XLA venv
        sys.path.insert(0, ROOT)
