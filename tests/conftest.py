"""Fixtures shared by every test folder.

pytest puts this folder on sys.path (a conftest.py outside any package), so the helper
modules beside it import by name: ``support`` (repo root, a model artifact factory),
``gcs_emulator`` (a GCS emulator on loopback), ``recording_server`` (a Vertex AI REST stand-in).
"""
import builtins

import pytest

from gcs_emulator import gcs  # noqa: F401  the GCS emulator fixture, for any test that names it


@pytest.fixture(autouse=True)
def _builtin_print_restored():
    """kfp.local indents task output by swapping ``builtins.print`` per task; tasks of a
    ParallelFor run in threads and restore it out of order, which can leave the indenting
    print installed for every later test (seen as a later test's stdout lines indented)."""
    saved = builtins.print
    yield
    builtins.print = saved
