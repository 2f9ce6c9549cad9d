"""rentalml.features.feast_import: a process that uses Feast or MLflow through rentalml does not load torch or
typeguard's instrumentation at Feast's import, still builds and applies the project's feature definitions, and
RENTALML_FEAST_TYPECHECK=1 turns Feast's typeguard checks back on (so the definitions are checked by them here).

Each case runs in a fresh interpreter: the switch acts on a process's first Feast import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("feast")

PROBE = r"""
import json, resource, sys
from rentalml.registry import mlflow_registry
import mlflow.tracking.request_header.registry as r  # loads the entry points, Feast's among them
providers = [type(p).__name__ for p in r._request_header_provider_registry]
from rentalml.features import store as fs
st = fs.open_store()
names = sorted(fs.apply(st))
import feast, typeguard
try:
    feast.Entity(name=123, join_keys=["user_id"])  # a wrong argument type
    wrong = "accepted"
except typeguard.TypeCheckError as exc:
    wrong = f"TypeCheckError: {exc}"
except Exception as exc:
    wrong = f"{type(exc).__name__}"
from feast.torch_wrapper import get_torch
before = "torch" in sys.modules
torch = get_torch()
print(json.dumps({"providers": providers, "torch_at_import": before,
                  "torch_on_call": torch.__name__ == "torch" and "torch" in sys.modules,
                  "applied": names, "wrong_type": wrong}))
"""


def _probe(tmp_path, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RENTALML_HOME": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_feast_is_imported_without_torch_or_instrumentation(tmp_path):
    doc = _probe(tmp_path, RENTALML_FEAST_TYPECHECK="0")
    # Feast 0.67 imports torch at import time; here only on first use, also when MLflow loaded Feast first:
    # Feast registers an `mlflow.request_header_provider` entry point, which MLflow imports (and so all of Feast)
    # at its first REST call in every process that talks to an MLflow server (the pipeline's gate, register and
    # publish steps, serving in registry mode)
    assert "FeastMLflowHeaderProvider" in doc["providers"], doc
    assert doc["torch_at_import"] is False, doc
    assert doc["torch_on_call"] is True
    assert not doc["wrong_type"].startswith("TypeCheckError"), doc  # typeguard's instrumentation is off
    assert doc["applied"], doc  # the project's definitions build and apply


def test_typecheck_switch_checks_the_definitions(tmp_path):
    doc = _probe(tmp_path, RENTALML_FEAST_TYPECHECK="1")
    assert doc["wrong_type"].startswith("TypeCheckError"), doc  # typeguard's checks are on in this process
    assert doc["applied"], doc  # and the project's definitions pass them

