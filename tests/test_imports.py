"""Importing caretaker's processes and tasks must not pull in the heavy analysis libraries."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import tasks
from tests.conftest import ROOT

HEAVY = ("pandas", "scipy")
# The analysis code itself: it may import them, and nothing else may import it at import time.
ANALYSIS = {
    "tasks.anomaly",
    "tasks.forecast",
    "tasks.sources",
    "tasks.prometheus",
    "tasks.detection",
    "tasks.capacity",
    "tasks.review",
}

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def task_modules() -> list[str]:
    found = [f"tasks.{module.name}" for module in pkgutil.iter_modules(tasks.__path__)]
    return [name for name in found if name not in ANALYSIS]


def test_task_modules_are_found() -> None:
    assert {"tasks.checks", "tasks.commands", "tasks.actions"} <= set(task_modules())


def test_imports_leave_out_pandas_and_scipy() -> None:
    names = ["workers.app", "workers.webhook", "workers.cli", "workers.entry", *task_modules()]

    done = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert set(names) <= set(loaded)
    assert [name for name in loaded if name.split(".")[0] in HEAVY] == []
