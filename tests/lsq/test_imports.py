"""The library stays free of orchestration and tracking: importing any ``lsq`` module pulls in neither
prefect nor mlflow (checked in a fresh interpreter, where nothing else has imported them)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import lsq

FORBIDDEN = ("prefect", "mlflow")

PROBE = """
import importlib, json, pkgutil, sys
import lsq
names = ["lsq"] + sorted("lsq." + m.name for m in pkgutil.iter_modules(lsq.__path__) if m.name != "__main__")
for name in names:
    importlib.import_module(name)
leaked = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"imported": names, "leaked": leaked}))
"""


def test_no_prefect_or_mlflow_in_the_library():
    # "json" is forbidden too, as a control: every lsq module imports it, so the probe must report it
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([*FORBIDDEN, "json"])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"lsq." + m.name for m in pkgutil.iter_modules(lsq.__path__) if m.name != "__main__"}
    assert expected >= {"lsq.api", "lsq.cli", "lsq.squeeze", "lsq.linalg", "lsq.adapter", "lsq.policies"}
    assert set(result["imported"]) == expected | {"lsq"}
    assert "json" in result["leaked"], "the probe cannot see imports"
    assert [m for m in result["leaked"] if m != "json"] == [], f"lsq imports {result['leaked']}"
