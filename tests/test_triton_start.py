"""start_triton's retry of the python backend's known start-up abort (triton-inference-server/server#8882:
`terminate called after throwing an instance of 'boost::interprocess::lock_exception'`, SIGABRT while the stubs
load; seen here with four test workers on two cores), and only that abort. A stand-in binary plays tritonserver:
it parses the ports start_triton passes, then either aborts the way Triton does or answers /v2/health/ready."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from rentalml.services import ServiceUnavailable, TritonInstall, start_triton

FAKE = r'''#!{python}
import http.server, os, signal, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
count = os.path.join(os.path.dirname(__file__), "starts")
n = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(n))
if n <= int(os.environ["FAKE_ABORTS"]):
    print(os.environ["FAKE_ABORT_TEXT"], flush=True)
    os.kill(os.getpid(), signal.SIGABRT)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", int(args["--http-port"])), Ready).serve_forever()
'''

ABORT = ("terminate called after throwing an instance of 'boost::interprocess::lock_exception'\n"
         "  what():  boost::interprocess::lock_exception")


def _install(tmp_path: Path) -> TritonInstall:
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text(FAKE.replace("{python}", sys.executable))
    binary.chmod(0o755)
    return TritonInstall(tmp_path, binary, tmp_path / "backends", tmp_path / "libs", tmp_path / "site")


def _starts(inst: TritonInstall) -> int:
    return int((inst.binary.parent / "starts").read_text())


def test_the_shm_abort_is_retried_and_logged(tmp_path, monkeypatch, caplog):
    inst = _install(tmp_path)
    monkeypatch.setenv("FAKE_ABORTS", "2")
    monkeypatch.setenv("FAKE_ABORT_TEXT", ABORT)
    with caplog.at_level(logging.WARNING, logger="rentalml.services"):
        svc = start_triton(tmp_path / "repo", install=inst, log=tmp_path / "triton.log", timeout=30)
    try:
        assert _starts(inst) == 3  # two aborts, then ready
        warnings = [r.getMessage() for r in caplog.records if "aborted at start-up" in r.getMessage()]
        assert len(warnings) == 2 and "attempt 1 of 3" in warnings[0] and "attempt 2 of 3" in warnings[1]
        assert (tmp_path / "triton.log").read_text().count("lock_exception'") == 2  # the aborts stay in the log
    finally:
        svc.stop()


def test_the_shm_abort_gives_up_after_the_attempts(tmp_path, monkeypatch):
    inst = _install(tmp_path)
    monkeypatch.setenv("FAKE_ABORTS", "9")
    monkeypatch.setenv("FAKE_ABORT_TEXT", ABORT)
    with pytest.raises(ServiceUnavailable, match="lock_exception") as err:
        start_triton(tmp_path / "repo", install=inst, timeout=30, attempts=2)
    assert "exited with code -6" in str(err.value) and _starts(inst) == 2


def test_any_other_abort_fails_at_once(tmp_path, monkeypatch):
    """A model's own crash is not an upstream race: no second start."""
    inst = _install(tmp_path)
    monkeypatch.setenv("FAKE_ABORTS", "1")
    monkeypatch.setenv("FAKE_ABORT_TEXT", "E1203 model.py: Segmentation fault in rental-ranker")
    with pytest.raises(ServiceUnavailable, match="Segmentation fault"):
        start_triton(tmp_path / "repo", install=inst, timeout=30)
    assert _starts(inst) == 1
