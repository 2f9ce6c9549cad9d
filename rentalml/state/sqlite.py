"""The SQLite backend of the stream state store: the same semantics as the Redis Lua scripts, one SQLite
transaction per apply (a single processor instance; serving reads the file)."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from pathlib import Path

from rentalml.config import Settings
from rentalml.features.formulas import FINE_KEEP_BUCKETS

from .base import FIVE_MIN, HOUR, Applied, StateStore, decode_attributes, user_event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS hashes (key TEXT, field TEXT, value TEXT, PRIMARY KEY (key, field));
CREATE TABLE IF NOT EXISTS zsets (key TEXT, member TEXT, score REAL, PRIMARY KEY (key, member));
CREATE TABLE IF NOT EXISTS lists (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, value TEXT);
CREATE INDEX IF NOT EXISTS lists_key ON lists (key, seq);
CREATE TABLE IF NOT EXISTS dedupe (event_id TEXT PRIMARY KEY, hour INTEGER);
CREATE INDEX IF NOT EXISTS dedupe_hour ON dedupe (hour);
"""


class SQLiteState(StateStore):
    """The same semantics as the Lua script, one SQLite transaction per apply (single processor instance)."""

    def __init__(self, settings: Settings, path: Path):
        super().__init__(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        # readers (a server's request threads) share the connection: serialized by SQLite and by self._read
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self._read = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    # small hash/zset helpers over the tables
    def _hget(self, key: str, f: str) -> str | None:
        row = self.db.execute("SELECT value FROM hashes WHERE key=? AND field=?", (key, f)).fetchone()
        return row[0] if row else None

    def _hset(self, key: str, f: str, v: str) -> None:
        self.db.execute("INSERT INTO hashes VALUES (?,?,?) ON CONFLICT(key, field) DO UPDATE SET value=excluded.value",
                        (key, f, v))

    def _hincr(self, key: str, f: str) -> None:
        self.db.execute("INSERT INTO hashes VALUES (?,?,'1') ON CONFLICT(key, field) DO UPDATE SET "
                        "value=CAST(CAST(value AS INTEGER) + 1 AS TEXT)", (key, f))

    def _hgetall(self, key: str) -> dict[str, str]:
        return dict(self.db.execute("SELECT field, value FROM hashes WHERE key=?", (key,)).fetchall())

    def _prune(self, key: str, min_h: int, min_m: int) -> dict[str, str]:
        """Delete counter fields older than the windows need (as _LUA_PRUNE); return the kept fields."""
        out = {}
        for f, v in self._hgetall(key).items():
            kind, _, b = f.partition(":")
            if b and b.lstrip("-").isdigit() and int(b) < (min_m if kind == "v5" else min_h):
                self.db.execute("DELETE FROM hashes WHERE key=? AND field=?", (key, f))
            else:
                out[f] = v
        return out

    def _maxfield(self, key: str, f: str, v: float) -> None:
        old = self._hget(key, f)
        if old is None or v > float(old):
            self._hset(key, f, f"{v:.6f}")

    def apply(self, events: list[dict], batch: str | None = None) -> Applied:  # one local transaction: no lost reply
        P, db = self.prefix, self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM kv WHERE key=?", (f"{P}:clock",)).fetchone()
            clock = float(row[0]) if row else 0.0
            outcomes: list[str] = []
            eng: dict[str, bool] = {}
            prop: dict[str, bool] = {}
            usr: dict[str, bool] = {}

            def touch(t: dict, i: str, changed: bool) -> None:
                if changed or i not in t:
                    t[i] = changed

            for e in events:
                h = math.floor(e["ts"] / HOUR)
                if db.execute("SELECT 1 FROM dedupe WHERE event_id=?", (e["id"],)).fetchone():
                    outcomes.append("duplicate")
                    if e["k"] == "i":
                        touch(eng, e["p"], False)
                        touch(usr, e["u"], False)
                    else:
                        touch(prop, e["p"], False)
                    continue
                if e["k"] == "i" and e["ts"] < clock - self.lateness:
                    outcomes.append("late")
                    continue
                outcomes.append("processed")
                db.execute("INSERT INTO dedupe VALUES (?,?)", (e["id"], h))
                clock = max(clock, e["ts"])
                if e["k"] == "i":
                    ek = f"{P}:eng:{e['p']}"
                    self._hincr(ek, f"{e['t']}:{h}")
                    if e["t"] == "v":
                        self._hincr(ek, f"v5:{math.floor(e['ts'] / FIVE_MIN)}")
                    self._maxfield(ek, "last", e["ts"])
                    uk = f"{P}:user:{e['u']}"
                    self._hincr(uk, f"n:{h}")
                    self._maxfield(uk, "last", e["ts"])
                    db.execute("INSERT INTO zsets VALUES (?,?,?) ON CONFLICT(key, member) DO UPDATE SET "
                               "score=MAX(score, excluded.score)", (f"{P}:hist:{e['u']}", e["p"], e["ts"]))
                    db.execute("INSERT INTO lists (key, value) VALUES (?,?)",
                               (f"{P}:uev:{e['u']}", f"{e['ts']:.3f}|{e['t']}|{e['p']}"))
                    touch(eng, e["p"], True)
                    touch(usr, e["u"], True)
                else:
                    pk = f"{P}:prop:{e['p']}"
                    for k, v in e["a"].items():
                        at = self._hget(pk, "@" + k)
                        if at is None or e["ts"] >= float(at):
                            self._hset(pk, k, v)
                            self._hset(pk, "@" + k, f"{e['ts']:.6f}")
                    self._maxfield(pk, "_ts", e["ts"])
                    db.execute("INSERT INTO zsets VALUES (?,?,?) ON CONFLICT(key, member) DO UPDATE SET "
                               "score=MAX(score, excluded.score)", (f"{P}:props", e["p"], e["ts"]))
                    touch(prop, e["p"], True)
            db.execute("INSERT INTO kv VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (f"{P}:clock", f"{clock:.6f}"))
            db.execute("DELETE FROM dedupe WHERE hour < ?",
                       (math.floor((clock - self.lateness - self.margin) / HOUR) - 1,))
            now_us = time.time_ns() // 1000
            min_h = math.floor(clock / HOUR) - self.keep_h
            min_m = math.floor(clock / FIVE_MIN) - FINE_KEEP_BUCKETS

            def version(key: str, changed: bool) -> None:
                v = int(self._hget(key, "_v") or 0)
                if changed or v == 0:
                    self._hset(key, "_v", str(max(v + 1, now_us)))

            res = Applied(outcomes, clock)
            for i, changed in eng.items():
                version(f"{P}:eng:{i}", changed)
                res.engagement[i] = self._prune(f"{P}:eng:{i}", min_h, min_m)
            for i, changed in prop.items():
                version(f"{P}:prop:{i}", changed)
                res.properties[i] = self._hgetall(f"{P}:prop:{i}")
            for i, changed in usr.items():
                version(f"{P}:user:{i}", changed)
                res.users[i] = self._prune(f"{P}:user:{i}", min_h, min_m)
                hk = f"{P}:hist:{i}"
                db.execute("DELETE FROM zsets WHERE key=? AND member NOT IN (SELECT member FROM zsets WHERE key=? "
                           "ORDER BY score DESC, member DESC LIMIT ?)", (hk, hk, self.history_len))
                res.histories[i] = [(m, s) for m, s in db.execute(
                    "SELECT member, score FROM zsets WHERE key=? ORDER BY score, member", (hk,)).fetchall()]
                lk = f"{P}:uev:{i}"
                db.execute("DELETE FROM lists WHERE key=? AND seq NOT IN (SELECT seq FROM lists WHERE key=? "
                           "ORDER BY seq DESC LIMIT ?)", (lk, lk, self.taste_events))
                res.user_events[i] = [user_event(v) for (v,) in db.execute(
                    "SELECT value FROM lists WHERE key=? ORDER BY seq", (lk,)).fetchall()]
            db.execute("COMMIT")
            return res
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def refresh_engagement(self, property_ids: list[str]) -> Applied:
        db, P = self.db, self.prefix
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM kv WHERE key=?", (f"{P}:clock",)).fetchone()
            clock = float(row[0]) if row else 0.0
            res = Applied([], clock)
            now_us = time.time_ns() // 1000
            min_h = math.floor(clock / HOUR) - self.keep_h
            min_m = math.floor(clock / FIVE_MIN) - FINE_KEEP_BUCKETS
            for pid in property_ids:
                key = f"{P}:eng:{pid}"
                h = self._hgetall(key)
                if not h:
                    continue
                self._hset(key, "_v", str(max(int(h.get("_v", 0)) + 1, now_us)))
                res.engagement[pid] = self._prune(key, min_h, min_m)
            db.execute("COMMIT")
            return res
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def due(self, clock: float, limit: int = 5000) -> list[str]:
        return [m for (m,) in self.db.execute("SELECT member FROM zsets WHERE key=? AND score<=? ORDER BY score "
                                              "LIMIT ?", (f"{self.prefix}:eng_due", clock, limit)).fetchall()]

    def schedule(self, due: dict[str, float | None]) -> None:
        key = f"{self.prefix}:eng_due"
        with self.db:
            for p, t in due.items():
                if t is None:
                    self.db.execute("DELETE FROM zsets WHERE key=? AND member=?", (key, p))
                else:
                    self.db.execute("INSERT INTO zsets VALUES (?,?,?) ON CONFLICT(key, member) DO UPDATE SET "
                                    "score=excluded.score", (key, p, t))

    def properties_since(self, ts: float) -> list[tuple[str, float]]:
        with self._read:
            return [(m, float(sc)) for m, sc in self.db.execute(
                "SELECT member, score FROM zsets WHERE key=? AND score>=? ORDER BY score, member",
                (f"{self.prefix}:props", ts)).fetchall()]

    def recent_history(self, user_id: str) -> list[str]:
        with self._read:
            return [m for (m,) in self.db.execute("SELECT member FROM zsets WHERE key=? ORDER BY score, member",
                                                  (f"{self.prefix}:hist:{user_id}",)).fetchall()]

    def property_attributes(self, property_ids: list[str]) -> dict[str, dict]:
        out = {}
        with self._read:
            for pid in property_ids:
                h = self._hgetall(f"{self.prefix}:prop:{pid}")
                if h:
                    out[pid] = decode_attributes(h)
        return out

    def seed_properties(self, attrs: dict[str, dict]) -> int:
        n = 0
        self.db.execute("BEGIN IMMEDIATE")
        for pid, a in attrs.items():
            key = f"{self.prefix}:prop:{pid}"
            if self.db.execute("SELECT 1 FROM hashes WHERE key=? LIMIT 1", (key,)).fetchone():
                continue
            for k, v in a.items():
                self._hset(key, k, json.dumps(v))
            n += 1
        self.db.execute("COMMIT")
        return n

    def close(self) -> None:
        self.db.close()
