"""Fixtures shared by every test folder.

pytest puts this folder on sys.path (a conftest.py outside any package), so the helper
modules beside it import by name: ``support`` (repo root, a model artifact factory),
``gcs_emulator`` (a GCS emulator on loopback), ``recording_server`` (a Vertex AI REST stand-in).
"""
from gcs_emulator import gcs  # noqa: F401  the GCS emulator fixture, for any test that names it
