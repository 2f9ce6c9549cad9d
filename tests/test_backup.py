"""`rentalml backup` / `rentalml restore`: a trained registry, the database of record, a real Feast
feature store (file registry, offline tables, Redis online store) and local state go into one archive; after
wiping $RENTALML_HOME a restore serves the same top-10 for 100 users (checked in a fresh process, as a restarted
server would) and the same online features, also into another $RENTALML_HOME; corrupt archives and non-empty
targets are refused. PostgreSQL variant for the database."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import uuid

import pytest
import sqlalchemy as sa
from conftest import FAST_PARAMS
from typer.testing import CliRunner

from rentalml.cli import app
from rentalml.config import get_settings
from rentalml.db import store
from rentalml.features import store as fs
from rentalml.ops import backup as bk
from rentalml.registry.mlflow_registry import fetch_bundle
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.pipeline import Pipeline
from rentalml.training.workflow import train_and_register

runner = CliRunner()
N_USERS = 100

#: run in a fresh interpreter: the champion's top-10 for the given users, per $RENTALML_HOME given
TOP10 = """
import json, sys
from rentalml.config import Settings
from rentalml.registry.mlflow_registry import fetch_bundle
from rentalml.runtime import Bundle, Pipeline
users = json.loads(sys.argv[1])
out = {}
for home in sys.argv[2:]:
    b = Bundle(fetch_bundle("champion", settings=Settings(home=home)))
    out[home] = {"version": b.model_version, "top10": Pipeline(b).run(users, 10).property_ids.tolist()}
print(json.dumps(out))
"""

STREAM_KEY = b"rentalml:stream:seen:e_000001"  # the stream processor's state (settings.stream.key_prefix)


def _clean_env(mp: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RENTALML_"):
            mp.delenv(key)


def _use_home(mp: pytest.MonkeyPatch, home, **env) -> None:
    _clean_env(mp)
    mp.setenv("RENTALML_HOME", str(home))
    for k, v in env.items():
        mp.setenv(f"RENTALML_{k}", v)
    get_settings.cache_clear()


ONLINE_PROPS = [f"p_{i:06d}" for i in range(1, 21)]


def _online(fstore, users, props) -> dict:
    """Online feature values (Feast get_online_features) for some users and properties, JSON-comparable."""
    u = fs.online_features(fstore, user_ids=users)
    p = fs.online_features(fstore, property_ids=props)
    return json.loads(json.dumps({"users": u.to_dict("records"), "properties": p.to_dict("records")}, default=str))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, market, redis_url):
    """A trained, seeded deployment under a temporary $RENTALML_HOME, backed up to an archive."""
    base = tmp_path_factory.mktemp("backup")
    home = base / "home"
    redis = redis_url.rsplit("/", 1)[0] + "/11"  # a database of its own on the shared server
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)  # nothing MLflow writes may land in the repository
        _use_home(mp, home, REDIS_URL=redis)
        res = train_and_register(market, "collaborative", "random-75-25", 10, 42, dict(FAST_PARAMS))
        assert res["registry"]["alias"] == "champion"
        seeded = store.seed(None, market)
        # a real Feast store: registry file and offline tables under $RENTALML_HOME/feast, online store in Redis
        r = bk._redis_client(redis)
        r.flushdb()
        fstore = fs.open_store()
        fs.build_offline_tables(market, fs.data_dir(fstore))
        fs.apply(fstore)
        fs.materialize(fstore, fs.dataset_end(market))
        feast_keys = len(r.keys(b"*"))
        assert feast_keys > 0
        r.set(STREAM_KEY, b"1", ex=3600)
        r.set(b"other-app-key", b"not ours")
        (home / "validation").mkdir()
        (home / "validation" / "accepted.json").write_text('{"snapshot": "abc"}')

        users = sorted(market.interactions["user_id"].unique())[:N_USERS]
        champion = Bundle(fetch_bundle("champion"))
        before = {"version": champion.model_version,
                  "top10": Pipeline(champion).run(users, 10).property_ids.tolist(),
                  "db": store.stats()["rows"], "online": _online(fs.open_store(), users[:20], ONLINE_PROPS),
                  "feast_keys": feast_keys}
        archive = base / "rentalml.tar.gz"
        out = runner.invoke(app, ["backup", "--out", str(archive)])
        assert out.exit_code == 0, out.output
        yield {"home": home, "base": base, "archive": archive, "users": users, "before": before,
               "seeded": seeded, "redis": redis, "summary": json.loads(out.output), "mp": mp}
        r.flushdb()
        r.close()
    get_settings.cache_clear()


def test_archive_has_a_checksummed_manifest_of_every_component(deployment):
    manifest = bk.read_manifest(deployment["archive"])
    names = {c["name"]: c for c in manifest["components"]}
    assert set(names) == {"mlflow-backend", "mlflow-artifacts", "database", "feast", "feast-redis", "state"}
    assert names["mlflow-backend"]["kind"] == names["database"]["kind"] == "sqlite"
    # the project's and the stream state's keys only
    assert names["feast-redis"]["keys"] == deployment["before"]["feast_keys"] + 1
    feast_files = {m["path"] for m in names["feast"]["members"]}
    assert "feast/files/registry.db" in feast_files
    assert {"feast/files/data/property_attributes.parquet", "feast/files/data/user_taste.parquet"} <= feast_files
    assert any(m["path"].endswith("bundle.json") for m in names["mlflow-artifacts"]["members"])
    state = {m["path"] for m in names["state"]["members"]}
    assert "state/files/validation/accepted.json" in state
    assert not any("/bundles/" in p or p.endswith(("mlflow.db", "rentalml.db")) for p in state)  # no caches/dups
    assert all(len(m["sha256"]) == 64 for c in manifest["components"] for m in c["members"])
    assert manifest["versions"]["database_revision"] == "0001" and "mlflow" in manifest["versions"]
    assert deployment["summary"]["archive"] == str(deployment["archive"])


def test_wipe_then_restore_serves_identical_recommendations(deployment):
    home, archive, before = deployment["home"], deployment["archive"], deployment["before"]
    shutil.rmtree(home)  # everything gone: registry, artifacts, database, feature store, state
    r = bk._redis_client(deployment["redis"])
    r.delete(*[k for k in r.keys(b"*") if k != b"other-app-key"])  # the online store and stream state gone too
    assert r.dbsize() == 1
    get_settings.cache_clear()
    out = runner.invoke(app, ["restore", str(archive)])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert set(res["restored"]) >= {"mlflow-backend", "mlflow-artifacts", "database", "feast", "feast-redis"}
    assert res["overwritten"] == [] and res["relocated_artifact_uris"] == 0
    # another $RENTALML_HOME: the MLflow store's absolute artifact URIs follow the new root
    other = deployment["base"] / "elsewhere"
    from rentalml.config import Settings

    moved = bk.restore(archive, force=True, settings=Settings(home=other))  # force: the Redis store is shared
    assert moved["relocated_artifact_uris"] > 0
    con = sqlite3.connect(other / "mlflow.db")
    uris = [u for q in ("SELECT artifact_uri FROM runs", "SELECT artifact_location FROM experiments",
                        "SELECT source FROM model_versions", "SELECT storage_location FROM model_versions")
            for (u,) in con.execute(q)]
    con.close()
    assert not any(str(home) + "/" in u for u in uris) and any(str(other) in u for u in uris)
    # a fresh process, as a restarted server: the champion bundle comes from the restored registry + artifacts
    proc = subprocess.run([sys.executable, "-c", TOP10, json.dumps(deployment["users"]), str(home), str(other)],
                          capture_output=True, text=True, timeout=120, cwd=deployment["base"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(proc.stdout.strip().splitlines()[-1])
    for where in (str(home), str(other)):
        assert after[where]["version"] == before["version"]
        assert after[where]["top10"] == before["top10"]  # identical top-10 for 100 users
    assert len(before["top10"]) == N_USERS and all(len(t) == 10 and t[0] for t in before["top10"])
    assert store.stats()["rows"] == before["db"] == {"interactions": 8000, "properties": 200, "users": 400}
    get_settings.cache_clear()
    assert _online(fs.open_store(), deployment["users"][:20], ONLINE_PROPS) == before["online"]  # Feast reads back
    assert (home / "validation" / "accepted.json").read_text() == '{"snapshot": "abc"}'
    assert r.get(STREAM_KEY) == b"1" and 0 < r.ttl(STREAM_KEY) <= 3600  # the expiry survives too
    r.close()


def test_restore_refuses_non_empty_targets_without_force(deployment):
    out = runner.invoke(app, ["restore", str(deployment["archive"])])
    assert out.exit_code == 1
    assert "non-empty" in out.output and "--force" in out.output and "database" in out.output
    store.insert_interactions(None, [{"event_id": "after-backup", "user_id": "u_x", "property_id": "p_x",
                                      "timestamp": "2025-01-01T00:00:00Z"}])
    out = runner.invoke(app, ["restore", str(deployment["archive"]), "--force"])
    assert out.exit_code == 0, out.output
    assert store.stats()["rows"] == deployment["before"]["db"]  # back to the backed-up state


def test_corrupt_archive_is_refused_before_anything_changes(deployment, tmp_path):
    src = tmp_path / "x"
    with tarfile.open(deployment["archive"]) as tar:
        tar.extractall(src, filter="data")
    db = src / "database" / "db.sqlite"
    db.write_bytes(db.read_bytes()[:-10] + b"0123456789")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, arcname=p.name)
    before = store.stats()["rows"]
    with pytest.raises(bk.BackupError, match="checksum mismatch for database/db.sqlite"):
        bk.restore(bad, force=True)
    assert store.stats()["rows"] == before
    with pytest.raises(bk.BackupError, match="no such backup file"):
        bk.restore(tmp_path / "missing.tar.gz")


def test_postgres_database_of_record_round_trip(postgres_url, market, tmp_path, monkeypatch):
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        monkeypatch.chdir(tmp_path)
        _use_home(monkeypatch, tmp_path / "home", DATABASE_URL=url)
        store.seed(None, market)
        before = store.load_from_db()
        manifest = bk.backup(tmp_path / "pg.tar.gz")
        db = {c["name"]: c for c in manifest["components"]}["database"]
        assert db["kind"] == "postgresql" and db["members"][0]["path"] == "database/db.dump"
        with admin.connect() as conn:  # wipe: the database is dropped and created empty
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        shutil.rmtree(tmp_path / "home")
        res = bk.restore(tmp_path / "pg.tar.gz")
        assert "database" in res["restored"]
        after = store.load_from_db()
        assert store.stats()["rows"] == {"interactions": 8000, "properties": 200, "users": 400}
        assert store.stats()["revision"] == "0001"
        assert after.snapshot_hash() == before.snapshot_hash()
        assert after.items.equals(before.items) and after.users.equals(before.users)
        with pytest.raises(bk.BackupError, match="non-empty"):
            bk.restore(tmp_path / "pg.tar.gz")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        get_settings.cache_clear()
