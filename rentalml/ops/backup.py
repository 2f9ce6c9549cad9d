"""`rentalml backup` / `rentalml restore`: one tar.gz with everything a deployment needs to come back.

Components (each one a folder in the archive, listed in `manifest.json` with a SHA-256 per file):
- `mlflow-backend`: the tracking/registry store — SQLite through the sqlite3 online-backup API (a consistent
  copy while servers run), PostgreSQL through `pg_dump --format=custom`; an HTTP tracking server is skipped
  (it has its own backend to back up; the manifest says so).
- `mlflow-artifacts`: the local artifact root (`settings.artifact_root`, file://): bundles, reports.
- `database`: the database of record (`settings.db_url`), SQLite or PostgreSQL as above.
- `feast`: `$RENTALML_HOME/feast/` (registry file, SQLite online store) and, when `settings.redis_url` is set,
  the Redis online-store keys of the Feast project (DUMP/PTTL, restored with RESTORE … REPLACE).
- `state`: the rest of `$RENTALML_HOME` (validation references, data, ...); caches (`bundles/`) are left out:
  they are re-fetched from the registry.

Each component is a `Target` (one interface: write / has_data / load), one subclass per kind of store:
SQLiteTarget, PostgresTarget, DirTarget, RedisTarget, SkippedTarget; `targets(settings)` lists this
deployment's components.

Restore writes into the locations of the *current* settings, verifies every checksum before touching
anything, and refuses a non-empty target unless `force`. When the artifact root moved (another
$RENTALML_HOME), the MLflow store's artifact locations are rewritten to the new root.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

from rentalml.config import Settings, get_settings

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: names under $RENTALML_HOME that are caches, never backed up
CACHE_DIRS = ("bundles",)
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


class BackupError(RuntimeError):
    """A backup or restore that cannot proceed; the message says which component and why."""


# ------------------------------------------------------------------------------------------ targets
class Target(ABC):
    """One component of a deployment, backed up into the archive folder `name`: where it lives (`location`: a
    file path, directory or SQLAlchemy/Redis URL) and how it is written, checked and read back. One subclass
    per kind of store (`kind` is recorded in the manifest; restore needs the same kind)."""

    kind: ClassVar[str]

    def __init__(self, name: str, location: str = "", note: str = ""):
        self.name, self.location, self.note = name, location, note

    def dump(self, stage: Path) -> dict:
        """Write the component under stage/<name>/; returns its manifest entry (members added by the caller)."""
        d = stage / self.name
        d.mkdir(parents=True)
        return {"name": self.name, "kind": self.kind, **self.write(d)}

    @abstractmethod
    def write(self, dest: Path) -> dict:
        """Copy the component's data into `dest`; returns manifest fields (source, notes, counts)."""

    @abstractmethod
    def has_data(self) -> bool:
        """Whether the target holds data a restore would overwrite."""

    @abstractmethod
    def load(self, src: Path) -> None:
        """Replace the target's data with the backed-up copy in `src` (what `write` wrote)."""

    def describe(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.describe()!r})"


class SQLiteTarget(Target):
    """A SQLite database file, copied through the sqlite3 online-backup API (consistent while servers run)."""

    kind = "sqlite"

    def write(self, dest: Path) -> dict:
        if not Path(self.location).exists():
            return {"source": self.location, "note": "absent"}
        sqlite_copy(Path(self.location), dest / "db.sqlite")
        return {"source": self.location}

    def has_data(self) -> bool:
        return _sqlite_has_rows(Path(self.location))

    def load(self, src: Path) -> None:
        dst = Path(self.location)
        for suffix in SQLITE_SIDECARS:
            Path(str(dst) + suffix).unlink(missing_ok=True)
        sqlite_copy(src / "db.sqlite", dst)


class PostgresTarget(Target):
    """A PostgreSQL database: `pg_dump --format=custom`, restored with `pg_restore --clean` in one transaction."""

    kind = "postgresql"

    def write(self, dest: Path) -> dict:
        from rentalml.db.store import safe_url

        plain, env = _pg_env(self.location)
        info = {"source": safe_url(self.location), "server_version": _pg_server_version(self.location)}
        _run([_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", "-f", str(dest / "db.dump"),
              "-d", plain], env, self.name)
        return info

    def has_data(self) -> bool:
        return _pg_has_rows(self.location)

    def load(self, src: Path) -> None:
        plain, env = _pg_env(self.location)
        _run([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--no-privileges",
              "--single-transaction", "-d", plain, str(src / "db.dump")], env, self.name)

    def describe(self) -> str:
        return "postgresql"


class DirTarget(Target):
    """A directory tree (SQLite files in it through the backup API, caches and other targets excluded).
    `replace`: a restore replaces the folder as a whole (the state folder instead receives the files)."""

    kind = "dir"

    def __init__(self, name: str, location: str, note: str = "", exclude: list[Path] | None = None,
                 replace: bool = True):
        super().__init__(name, location, note)
        self.exclude: list[Path] = list(exclude or [])
        self.replace = replace

    def write(self, dest: Path) -> dict:
        if not Path(self.location).is_dir():
            return {"source": self.location, "note": "absent"}
        _copy_tree(Path(self.location), dest / "files", self.exclude)
        return {"source": self.location}

    def has_data(self) -> bool:
        return _dir_nonempty(Path(self.location), self.exclude)

    def load(self, src: Path) -> None:
        dst = Path(self.location)
        if self.replace and dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True, exist_ok=True)
        if (src / "files").is_dir():
            _copy_tree(src / "files", dst)


class RedisTarget(Target):
    """The keys of a Redis database matching `patterns` (SCAN MATCH): DUMP/PTTL, restored with RESTORE … REPLACE."""

    kind = "redis"

    def __init__(self, name: str, location: str, patterns: list[bytes], note: str = ""):
        super().__init__(name, location, note)
        self.patterns = patterns

    def write(self, dest: Path) -> dict:
        info: dict = {"source": _safe_redis(self.location), "patterns": [p.decode() for p in self.patterns]}
        client = _redis_client(self.location)
        n = 0
        with open(dest / "keys.jsonl", "w") as fh:
            for key in _redis_keys(client, self.patterns):
                value, ttl = client.dump(key), client.pttl(key)
                if value is None:  # expired meanwhile
                    continue
                fh.write(json.dumps({"key": base64.b64encode(key).decode(), "pttl": max(int(ttl), 0),
                                     "dump": base64.b64encode(value).decode()}) + "\n")
                n += 1
        client.close()
        info["keys"] = n
        return info

    def has_data(self) -> bool:
        client = _redis_client(self.location)
        try:
            return next(_redis_keys(client, self.patterns), None) is not None
        finally:
            client.close()

    def load(self, src: Path) -> None:
        client = _redis_client(self.location)
        try:
            pipe = client.pipeline(transaction=False)
            with open(src / "keys.jsonl") as fh:
                for line in fh:
                    r = json.loads(line)
                    pipe.restore(base64.b64decode(r["key"]), int(r["pttl"]), base64.b64decode(r["dump"]),
                                 replace=True)
            pipe.execute()
        finally:
            client.close()

    def describe(self) -> str:
        return _safe_redis(self.location)


class SkippedTarget(Target):
    """A component this deployment does not back up itself (a remote store with its own backups); `note` says
    why. It writes only the note and is never restored."""

    kind = "skip"

    def write(self, dest: Path) -> dict:
        return {"note": self.note}

    def has_data(self) -> bool:
        return False

    def load(self, src: Path) -> None:
        raise BackupError(f"{self.name}: not restorable here ({self.note})")


def _sql_target(name: str, url: str) -> Target:
    import sqlalchemy as sa

    u = sa.engine.make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if not u.database or u.database == ":memory:":
            return SkippedTarget(name, note="in-memory SQLite")
        return SQLiteTarget(name, str(Path(u.database).resolve()))
    if backend == "postgresql":
        return PostgresTarget(name, url)
    return SkippedTarget(name, note=f"{backend}: back up with the database's own tools")


def _local_dir(uri: str) -> Path | None:
    p = urlparse(uri)
    if p.scheme == "file":
        return Path(unquote(p.path))
    if p.scheme == "" or len(p.scheme) == 1:  # a plain path (or a Windows drive letter)
        return Path(uri)
    return None


def redis_patterns(settings: Settings) -> list[bytes]:
    """Feast's Redis online-store keys end with the project name; the stream processor's state keys start with
    its prefix (both restored together, so the incremental features continue from the restored state)."""
    project = getattr(settings.feast, "project", "rentalml")
    patterns = [b"*" + project.encode()]
    stream = getattr(settings, "stream", None)
    if stream is not None and getattr(stream, "key_prefix", None):
        patterns.append(stream.key_prefix.encode() + b"*")
    return patterns


def targets(settings: Settings) -> list[Target]:
    """The components of this deployment, in backup order: the MLflow backend store and artifacts, the
    database of record, the Feast folder (registry file, SQLite online store), a Feast SQL registry of its own,
    the Redis keys (Feast online store and stream state), and the rest of $RENTALML_HOME ("state", last)."""
    home = settings.home_dir
    out: list[Target] = []
    uri = settings.tracking_uri
    if uri.startswith(("sqlite:", "postgresql:", "postgresql+", "postgres:")):
        out.append(_sql_target("mlflow-backend", uri))
    elif (d := _local_dir(uri)) is not None:
        out.append(DirTarget("mlflow-backend", str(d.resolve())))
    else:
        out.append(SkippedTarget("mlflow-backend", note=f"tracking server {uri}: back up its own store"))
    art = _local_dir(settings.artifact_root)
    out.append(DirTarget("mlflow-artifacts", str(art.resolve())) if art is not None
               else SkippedTarget("mlflow-artifacts", note=f"remote artifact root {settings.artifact_root}"))
    out.append(_sql_target("database", settings.db_url))
    out.append(DirTarget("feast", str(home / "feast")))
    registry_url = getattr(settings.feast, "registry_url", None)
    if registry_url and registry_url not in (uri, settings.db_url):  # a SQL registry in a database of its own
        out.append(_sql_target("feast-registry", registry_url))
    if settings.redis_url:
        out.append(RedisTarget("feast-redis", settings.redis_url, redis_patterns(settings)))
    handled = [Path(t.location) for t in out if t.kind in ("sqlite", "dir")]
    excluded = handled + [home / c for c in CACHE_DIRS]
    out.append(DirTarget("state", str(home), exclude=excluded, replace=False))
    return out


# ------------------------------------------------------------------------------------------ helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == SQLITE_HEADER
    except OSError:
        return False


def sqlite_copy(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite database (online-backup API); `dst` is overwritten in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


def _sqlite_has_rows(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return any(con.execute(f'SELECT 1 FROM "{n}" LIMIT 1').fetchone() for n in names
                   if n != "alembic_version" and not n.startswith("sqlite_"))
    finally:
        con.close()


def _pg_env(url: str) -> tuple[str, dict]:
    """libpq connection string (no password in argv) and the environment carrying the password."""
    import sqlalchemy as sa

    u = sa.engine.make_url(url)
    env = dict(os.environ)
    if u.password:
        env["PGPASSWORD"] = u.password
    plain = u.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    return plain, env


def _pg_tool(name: str) -> str:
    from rentalml.services import ServiceUnavailable, _pg_bin

    try:
        return _pg_bin(name)
    except ServiceUnavailable as exc:
        raise BackupError(f"{name} not found: install the PostgreSQL client tools ({exc})") from exc


def _run(cmd: list[str], env: dict, what: str) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise BackupError(f"{what}: {Path(cmd[0]).name} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")


def _pg_has_rows(url: str) -> bool:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            names = [n for n in sa.inspect(conn).get_table_names() if n != "alembic_version"]
            return any(conn.execute(sa.text(f'SELECT 1 FROM "{n}" LIMIT 1')).first() for n in names)
    finally:
        eng.dispose()


def _pg_server_version(url: str) -> str:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            return str(conn.execute(sa.text("SHOW server_version")).scalar_one())
    finally:
        eng.dispose()


def _copy_tree(src: Path, dst: Path, exclude: list[Path] = ()) -> None:
    """Copy a directory; SQLite files through the backup API, their -wal/-shm sidecars left out."""
    excluded = {p.resolve() for p in exclude}
    for root, dirs, files in os.walk(src):
        r = Path(root)
        dirs[:] = sorted(d for d in dirs if (r / d).resolve() not in excluded)
        for f in sorted(files):
            p = r / f
            if p.resolve() in excluded or f.endswith(SQLITE_SIDECARS) or p.is_symlink():
                continue
            out = dst / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if is_sqlite(p):
                sqlite_copy(p, out)
            else:
                shutil.copy2(p, out)


def _dir_nonempty(path: Path, exclude: list[Path] = ()) -> bool:
    if not path.is_dir():
        return False
    excluded = {p.resolve() for p in exclude}
    return any(p.resolve() not in excluded for p in path.iterdir())


def _redis_client(url: str):
    import redis

    return redis.Redis.from_url(url)


def _redis_keys(client, patterns: list[bytes]) -> Iterator[bytes]:
    seen = set()
    for pattern in patterns:
        for key in client.scan_iter(match=pattern, count=1000):
            if key not in seen:
                seen.add(key)
                yield key


# ------------------------------------------------------------------------------------------ backup
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("rentalml", "mlflow", "sqlalchemy", "alembic", "feast"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _safe_redis(url: str) -> str:
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@")
    return url


def backup(out: str | Path | None = None, settings: Settings | None = None) -> dict:
    """Write the backup archive; returns the manifest (with `archive`, the path written)."""
    from rentalml.db.store import current_revision

    s = settings or get_settings()
    now = datetime.now(UTC)
    out = Path(out) if out else Path.cwd() / f"rentalml-backup-{now:%Y%m%dT%H%M%SZ}.tar.gz"
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tgts = targets(s)
    partial = out.with_name(out.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="rentalml-backup-", dir=out.parent) as tmp:
        tgts[-1].exclude += [out, partial, Path(tmp)]  # never back up the backup (when written into the home)
        stage = Path(tmp) / "backup"
        stage.mkdir()
        components = []
        for t in tgts:
            info = t.dump(stage)
            members = sorted(p for p in (stage / t.name).rglob("*") if p.is_file())
            info["members"] = [{"path": p.relative_to(stage).as_posix(), "sha256": _sha256(p),
                                "bytes": p.stat().st_size} for p in members]
            components.append(info)
        versions = _versions()
        try:
            versions["database_revision"] = current_revision(s.db_url)
        except Exception:  # noqa: BLE001 - a database not created yet has no revision
            versions["database_revision"] = None
        manifest = {"format_version": FORMAT_VERSION, "created_at": now.isoformat(), "home": str(s.home_dir),
                    "artifact_root": s.artifact_root, "model_name": s.model_name, "versions": versions,
                    "components": components}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(stage / MANIFEST, arcname=MANIFEST)
            for c in components:
                if (stage / c["name"]).exists():
                    tar.add(stage / c["name"], arcname=c["name"])
        partial.replace(out)
    return {**manifest, "archive": str(out), "bytes": out.stat().st_size}


# ------------------------------------------------------------------------------------------ restore
def read_manifest(archive: str | Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        try:
            fh = tar.extractfile(MANIFEST)
        except KeyError as exc:
            raise BackupError(f"{archive}: no {MANIFEST} (not a rentalml backup)") from exc
        return json.loads(fh.read())


def _extract_verified(archive: Path, dest: Path) -> dict:
    """Extract (data filter: no absolute paths, links or escapes) and check every member against the manifest."""
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    manifest = json.loads((dest / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{archive}: format_version {manifest.get('format_version')} "
                          f"(this rentalml reads {FORMAT_VERSION})")
    listed = set()
    for c in manifest["components"]:
        for mem in c["members"]:
            p = dest / mem["path"]
            listed.add(p.resolve())
            if not p.is_file():
                raise BackupError(f"{archive}: {mem['path']} ({c['name']}) is missing from the archive")
            if _sha256(p) != mem["sha256"]:
                raise BackupError(f"{archive}: checksum mismatch for {mem['path']} ({c['name']}): corrupt backup")
    extra = [p for p in dest.rglob("*") if p.is_file() and p.name != MANIFEST and p.resolve() not in listed]
    if extra:
        raise BackupError(f"{archive}: files not in the manifest: {[str(p.relative_to(dest)) for p in extra][:5]}")
    return manifest


def _relocate_artifacts(t: Target, old_root: str, new_root: str) -> int:
    """The MLflow store records absolute artifact URIs: point them at the new artifact root."""
    import sqlalchemy as sa

    url = f"sqlite:///{t.location}" if t.kind == "sqlite" else t.location
    columns = {"experiments": ["artifact_location"], "runs": ["artifact_uri"],
               "model_versions": ["source", "storage_location"], "logged_models": ["artifact_location"]}
    eng = sa.create_engine(url)
    n = 0
    try:
        with eng.begin() as conn:
            present = set(sa.inspect(conn).get_table_names())
            for table, cols in columns.items():
                if table not in present:
                    continue
                have = {c["name"] for c in sa.inspect(conn).get_columns(table)}
                for col in cols:
                    if col in have:
                        n += conn.execute(sa.text(
                            f'UPDATE "{table}" SET "{col}" = :new || substr("{col}", :cut) '
                            f'WHERE substr("{col}", 1, :len) = :old'),
                            {"new": new_root, "old": old_root, "len": len(old_root),
                             "cut": len(old_root) + 1}).rowcount
    finally:
        eng.dispose()
    return n


def restore(archive: str | Path, force: bool = False, settings: Settings | None = None) -> dict:
    """Restore every component of `archive` into this deployment's locations (see the module doc)."""
    s = settings or get_settings()
    archive = Path(archive)
    if not archive.is_file():
        raise BackupError(f"{archive}: no such backup file")
    with tempfile.TemporaryDirectory(prefix="rentalml-restore-") as tmp:
        manifest = _extract_verified(archive, Path(tmp))
        tgts = {t.name: t for t in targets(s)}
        tgts["state"].exclude.append(archive.resolve())  # a backup kept in the home does not make it "non-empty"
        plan = []
        for c in manifest["components"]:
            t = tgts.get(c["name"])
            if c["kind"] == "skip" or not c["members"] and c["kind"] != "dir":
                continue
            if t is None or t.kind == "skip":
                raise BackupError(f"{c['name']}: the backup has it ({c['kind']}) but this deployment has no "
                                  f"target for it ({t.note if t else 'not configured'})")
            if t.kind != c["kind"]:
                raise BackupError(f"{c['name']}: backup is {c['kind']}, target is {t.kind} ({t.location}); "
                                  "restore into the same kind of store")
            plan.append((c, t))
        busy = [f"{t.name} ({t.describe()})" for _, t in plan if t.has_data()]
        if busy and not force:
            raise BackupError(f"refusing to overwrite non-empty targets: {', '.join(busy)} (use --force)")
        restored = []
        for c, t in plan:
            t.load(Path(tmp) / c["name"])
            restored.append(c["name"])
        relocated = 0
        backend = tgts.get("mlflow-backend")
        old_root, new_root = manifest.get("artifact_root"), s.artifact_root
        if old_root and old_root != new_root and backend and backend.kind in ("sqlite", "postgresql"):
            relocated = _relocate_artifacts(backend, old_root.rstrip("/"), new_root.rstrip("/"))
    return {"archive": str(archive), "created_at": manifest["created_at"], "restored": restored,
            "overwritten": busy, "relocated_artifact_uris": relocated}
