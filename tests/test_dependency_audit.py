"""Dependency audit (issue 13, point 8): requirements.lock against the vendored advisory snapshot, offline.

The snapshot is the PyPA advisory database (github.com/pypa/advisory-database, OSV format, the data pip-audit's
PyPI service serves), filtered to the lock's packages by `security/audit.py --refresh`. OSV range semantics:
https://ossf.github.io/osv-schema/#affectedranges-field (introduced / fixed / last_affected, ECOSYSTEM).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rentalml_security_audit", ROOT / "security" / "audit.py")
audit = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = audit
spec.loader.exec_module(audit)


def test_lock_pins_the_platform_versions_of_pyproject():
    pins = audit.read_lock()
    assert len(pins) > 100
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^",;\s]+)', pyproject):
        assert pins.get(audit.canonical(name), "").split("+")[0] == version.split("+")[0], name
    for name, version in (("torch", "2.13.0"), ("kfp", "2.17.3"), ("kserve", "0.21.0"), ("mlflow", "3.17.2"),
                          ("feast", "0.67.0")):
        assert pins[name].split("+")[0] == version


def test_snapshot_covers_the_lock():
    snap = json.loads(audit.SNAPSHOT.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", snap["commit"]) and snap["advisories"]
    missing = set(audit.read_lock()) - set(snap["packages"])
    assert not missing, f"lock packages the snapshot was not filtered for (run security/audit.py --refresh): {missing}"


@pytest.mark.parametrize(("pkg", "version", "hit"), [
    ("requests", "2.2.1", "PYSEC-2014-13"),     # listed version and range [0, 2.3.0)
    ("requests", "2.3.0", None),               # the fixed version itself
    ("pyyaml", "5.3.1", "PYSEC-2021-142"),      # fixed: 5.4 (a string, not the float 5.4 YAML would make)
    ("torch", "1.13.0+cpu", "PYSEC-2022-43015"),  # a local version is its public version for advisories
])
def test_auditor_finds_known_advisories(pkg, version, hit):
    snap = json.loads(audit.SNAPSHOT.read_text())
    ids = {f["id"] for f in audit.audit({pkg: version}, snap)}
    assert (hit in ids) if hit else "PYSEC-2014-13" not in ids, ids


def test_locked_set_has_no_unjustified_finding(capsys):
    rc = audit.main([])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "dependency audit:" in out


def test_every_justification_is_current_and_explained():
    """security/audit_ignore.json: each entry names a finding of today's lock (no stale silencing) and says why."""
    ignore = json.loads(audit.IGNORE.read_text())
    findings = audit.audit(audit.read_lock(), json.loads(audit.SNAPSHOT.read_text()))
    ids = {f["id"] for f in findings} | {a for f in findings for a in f["aliases"]}
    for advisory, why in ignore.items():
        assert advisory in ids, f"{advisory} no longer applies to requirements.lock: drop it from {audit.IGNORE.name}"
        assert len(why) > 40, advisory


def test_an_unjustified_finding_fails_the_audit(tmp_path, capsys):
    (tmp_path / "req.lock").write_text("requests==2.2.1\n")
    assert audit.main(["--lock", str(tmp_path / "req.lock")]) == 1
    assert "[OPEN] requests==2.2.1 PYSEC-2014-13" in capsys.readouterr().out
