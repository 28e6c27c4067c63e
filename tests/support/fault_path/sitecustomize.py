"""Imported by Python at the start of every interpreter that has this folder on its path: the processes of the
Airflow stack a fault test starts (``tests/support/faults.py`` says why and how). Inert unless
``CLOSEDLOOP_TEST_FAULTS`` names faults.

It takes the place of any other ``sitecustomize`` later on the path (the project's interpreter has none).
``faults.py`` is loaded from its file, so that nothing else of ``tests/`` lands on the processes' path.
"""

import os

if os.environ.get("CLOSEDLOOP_TEST_FAULTS"):
    import importlib.util
    import sys
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("closedloop_test_faults", Path(__file__).resolve().parents[1]
                                                   / "faults.py")
    _faults = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _faults
    _spec.loader.exec_module(_faults)
    _faults.install()
