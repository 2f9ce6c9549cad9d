"""docker/build.sh's control flow on a fresh machine, with the tools it calls stubbed on PATH (no podman needed).

The first `.ci/run` on a fresh machine (2026-12-02 19:01 UTC) built every image and then failed with
"line 109: rootfs: unbound variable": `make_base` set a RETURN trap that bash keeps after the function returns, so it
fired again when `main` returned, where `make_base`'s local `rootfs` no longer exists (`set -u`). Only a machine
without the local base image takes that path; every warm machine skipped it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUBS = {
    # no base image yet: `podman image exists` fails, the import succeeds, the inspect gives a size
    "podman": 'case "$1 $2" in "image exists") exit 1;; "image inspect") echo 199000000;; esac; cat >/dev/null; exit 0',
    "debootstrap": 'mkdir -p "${@: -2:1}/usr/lib/python3"; echo debootstrap "$@"',
    "buildah": "exit 0",
    "runc": "exit 0",
    "sudo": 'exec "$@"',
}


def test_building_the_base_on_a_fresh_machine_returns_cleanly(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(f"#!/usr/bin/env bash\n{body}\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RENTALML_PODMAN_DIR": str(tmp_path / "state")}
    res = subprocess.run(["bash", str(ROOT / "docker" / "build.sh"), "base"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "unbound variable" not in res.stderr
    assert "localhost/debian-python:bookworm: " in res.stderr  # make_base ran to its record line
    # the debootstrap target was removed on return
    rootfs = [line.split()[-2] for line in (tmp_path / "state" / "debootstrap.log").read_text().splitlines()]
    assert rootfs and not any(Path(p).exists() for p in rootfs), rootfs
