"""The local cache of registry bundles, and what a server does when the MLflow registry is unreachable.

Like KServe's storage initializer (the model is downloaded to local disk before the server starts and served from
there) and MLflow's own artifact download (a directory per version, reused when present), every bundle fetched
from the registry lives in `Settings.bundle_cache_dir` / <model name> / <version>: downloaded into a temporary
directory, checked against its checksums.json (rentalml.runtime.bundle.verify_bundle), and only then renamed into
place, so a half-written or corrupt download is never a cache entry. After each such fetch, `index.json` in the
cache dir records `model name -> alias -> version` (written to a temporary file and `os.replace`d: a reader sees
the old record or the new one, never half of one).

`rentalml.registry.mlflow_registry.resolve(alias, version, allow_cache=True)` fetches from the registry (this
module knows nothing of MLflow, so the two never import each other); when the registry cannot be reached
(connection refused, timeout, 5xx: `RegistryUnreachable`) it falls back to the alias's recorded version (or the
pinned version's directory) if that directory still verifies. A registry that answers "no such alias/version" is
authoritative: no fallback. `STATUS` says whether the last call reached the registry (health details, the
`ml_registry_up` gauge). `bound_client()` caps the MLflow client's timeout and retries so a down registry costs a
few seconds, not minutes (MLflow's defaults: 120 s timeout, 7 retries with backoff).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rentalml.config import Settings, get_settings

log = logging.getLogger(__name__)
INDEX = "index.json"

#: MLflow error codes meaning the registry answered but has nothing there (no fallback to the cache)
NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"})
#: MLflow error codes of a registry that is there but cannot answer now (treated like an unreachable one)
UNAVAILABLE_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                               "DEADLINE_EXCEEDED", "SERVICE_UNDER_MAINTENANCE", "ENDPOINT_NOT_FOUND"})


class RegistryUnreachable(ConnectionError):
    """The MLflow registry could not be reached or could not answer (network error, timeout, 5xx)."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether an MLflow client error means "no registry to talk to" rather than "the registry said no"."""
    import requests

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                          TimeoutError)):
            return True
        code = getattr(e, "error_code", None)
        if code in NOT_FOUND_CODES:
            return False
        if code in UNAVAILABLE_CODES or "API request to" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def bound_client(settings: Settings | None = None) -> None:
    """Cap the MLflow HTTP client's timeout and retries for a server's registry calls (environment variables
    MLflow reads on each request; ones already set by the operator are kept)."""
    serve = (settings or get_settings()).serve
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(serve.registry_timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max(0, int(serve.registry_retries))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int


# ---- the registry's reachability, as last seen ------------------------------------------------------------
@dataclass
class RegistryStatus:
    """Whether the last registry call of this process reached MLflow (None: none made yet)."""

    up: bool | None = None
    error: str = ""
    since: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mark(self, up: bool, error: str = "") -> None:
        with self._lock:
            if up != self.up:
                self.since = time.time()
                if up and self.up is False:
                    log.warning("model registry reachable again")
            self.up, self.error = up, ("" if up else error)

    def describe(self) -> dict:
        return {"reachable": self.up, "error": self.error or None, "since": round(self.since, 3)}


STATUS = RegistryStatus()


# ---- the cache --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """A bundle directory to serve: its registry version, and whether it came from the cache (registry down)."""

    path: Path
    version: str
    cached: bool = False
    reason: str = ""


class BundleCache:
    """Verified bundle directories under `root` / <model name> / <version>, and the alias record (index.json)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def dir(self, name: str, version: str) -> Path:
        return self.root / name / str(version)

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".index.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # several servers (or --workers) on one cache dir
            yield

    def read_index(self) -> dict:
        try:
            data = json.loads((self.root / INDEX).read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # never written half (os.replace); a hand edit: start over, say so
            log.warning("bundle cache %s: %s is not JSON (%s): ignored", self.root, INDEX, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, name: str, alias: str, version: str) -> None:
        """Record that `alias` of `name` pointed to `version`, whose directory is verified and in place."""
        with self._locked():
            index = self.read_index()
            index.setdefault(name, {}).setdefault("aliases", {})[alias] = {
                "version": str(version), "path": str(self.dir(name, version)), "fetched_at": round(time.time(), 3)}
            fd, tmp = tempfile.mkstemp(prefix=".index.", dir=self.root)
            with os.fdopen(fd, "w") as fh:
                json.dump(index, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / INDEX)

    def verified(self, name: str, version: str) -> Path | None:
        """The version's directory when it is there and matches its checksums.json, else None (logged)."""
        from rentalml.runtime.bundle import BundleIntegrityError, verify_bundle

        path = self.dir(name, version)
        if not (path / "bundle.json").exists():
            return None
        try:
            verify_bundle(path)
        except (BundleIntegrityError, ValueError, OSError) as exc:
            log.error("cached bundle %s refused: %s", path, exc)
            return None
        return path

    def lookup(self, name: str, alias: str | None = None, version: str | None = None) -> Resolved | None:
        """The cached bundle of a pinned `version`, or of the version `alias` last pointed to; None if absent
        or if it does not verify."""
        if version is None:
            entry = self.read_index().get(name, {}).get("aliases", {}).get(alias or "")
            if not entry:
                return None
            version = str(entry["version"])
        path = self.verified(name, version)
        return None if path is None else Resolved(path, str(version), cached=True)
