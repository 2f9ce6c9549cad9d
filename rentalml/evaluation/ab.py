"""A/B testing of the `champion` and `challenger` model versions: assignment, statistics, decision, aliases.

* `assign_variant(user_id, salt, challenger_percent)`: sticky, stateless assignment — sha256(salt, user id)
  mapped to one of 10,000 buckets; buckets below challenger_percent × 100 go to the challenger. The same user
  always lands in the same arm for a given salt; a new salt reshuffles everyone (a new experiment).
* Outcome events (contracts.md `ab_outcomes`): one `impression` per served item, `click` / `save` / `inquiry`
  from the client. Per arm: CTR = clicks / impressions, conversion = (saves + inquiries) / impressions, Wilson
  score intervals, and a two-sided two-proportion z-test (pooled) of challenger vs champion.
* Decision: fewer than `min_impressions` in either arm → keep (collect more data); p < alpha with the
  challenger better → promote; p < alpha with the challenger worse → roll back; else keep.
* `promote()` / `rollback()` move the MLflow aliases (the previous champion is recorded in the new champion's
  `rentalml.previous_champion` tag so a later rollback can restore it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rentalml.config import Settings, get_settings

CHAMPION, CHALLENGER = "champion", "challenger"
BUCKETS = 10_000
OUTCOMES = ("impression", "click", "save", "inquiry")
PREVIOUS_CHAMPION_TAG = "rentalml.previous_champion"


# ---- assignment ----------------------------------------------------------------------------------------
def bucket(user_id: str, salt: str) -> int:
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign_variant(user_id: str, salt: str, challenger_percent: float) -> str:
    """"champion" or "challenger" for this user: sticky per (salt, user id), challenger_percent % of users."""
    if challenger_percent <= 0:
        return CHAMPION
    return CHALLENGER if bucket(user_id, salt) < round(challenger_percent * BUCKETS / 100) else CHAMPION


# ---- statistics ----------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of p2 vs p1: (z, two-sided p-value). z > 0 means p2 > p1."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, 1.0
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p2 - p1) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class ArmStats:
    variant: str
    impressions: int = 0
    clicks: int = 0
    saves: int = 0
    inquiries: int = 0
    users: int = 0
    model_versions: list[str] = field(default_factory=list)

    @property
    def conversions(self) -> int:
        return self.saves + self.inquiries

    def rate(self, metric: str) -> float:
        x = self.clicks if metric == "ctr" else self.conversions
        return x / self.impressions if self.impressions else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conversions"] = self.conversions
        for metric in ("ctr", "conversion"):
            x = self.clicks if metric == "ctr" else self.conversions
            d[metric] = round(self.rate(metric), 6)
            d[f"{metric}_ci95"] = [round(v, 6) for v in wilson_interval(x, self.impressions)]
        return d


def summarize(events: Iterable[dict]) -> dict[str, ArmStats]:
    """Per-variant counts from outcome events (duplicates by event_id counted once)."""
    arms: dict[str, ArmStats] = {}
    users: dict[str, set] = {}
    versions: dict[str, set] = {}
    seen: set = set()
    for e in events:
        eid = e.get("event_id")
        if eid is not None:
            if eid in seen:
                continue
            seen.add(eid)
        v = str(e.get("variant") or CHAMPION)
        arm = arms.setdefault(v, ArmStats(v))
        outcome = e.get("outcome")
        if outcome == "impression":
            arm.impressions += 1
        elif outcome == "click":
            arm.clicks += 1
        elif outcome == "save":
            arm.saves += 1
        elif outcome == "inquiry":
            arm.inquiries += 1
        else:
            continue
        users.setdefault(v, set()).add(e.get("user_id"))
        if e.get("model_version") is not None:
            versions.setdefault(v, set()).add(str(e["model_version"]))
    for v, arm in arms.items():
        arm.users = len(users.get(v, ()))
        arm.model_versions = sorted(versions.get(v, ()))
    return arms


def decide(control: ArmStats, treatment: ArmStats, *, metric: str = "ctr", alpha: float = 0.05,
           min_impressions: int = 1000) -> dict:
    """promote / keep / rollback for the treatment (challenger) against the control (champion)."""
    if metric not in ("ctr", "conversion"):
        raise ValueError(f"metric must be 'ctr' or 'conversion', got {metric!r}")

    def x(a: ArmStats) -> int:
        return a.clicks if metric == "ctr" else a.conversions

    z, p = two_proportion_z_test(x(control), control.impressions, x(treatment), treatment.impressions)
    pc, pt = control.rate(metric), treatment.rate(metric)
    out = {"metric": metric, "control": control.variant, "treatment": treatment.variant,
           "control_rate": round(pc, 6), "treatment_rate": round(pt, 6),
           "absolute_lift": round(pt - pc, 6), "relative_lift": round((pt - pc) / pc, 6) if pc else None,
           "z": round(z, 4), "p_value": round(p, 6), "alpha": alpha, "min_impressions": min_impressions}
    if min(control.impressions, treatment.impressions) < min_impressions:
        return {**out, "decision": "keep",
                "reason": f"not enough data: {control.impressions} / {treatment.impressions} impressions, "
                          f"need {min_impressions} per variant"}
    if p < alpha and pt > pc:
        return {**out, "decision": "promote", "reason": f"challenger {metric} significantly higher (p={p:.3g})"}
    if p < alpha and pt < pc:
        return {**out, "decision": "rollback", "reason": f"challenger {metric} significantly lower (p={p:.3g})"}
    return {**out, "decision": "keep", "reason": f"no significant difference (p={p:.3g} >= {alpha})"}


def report(events: Iterable[dict], *, metric: str = "ctr", alpha: float | None = None,
           min_impressions: int | None = None, control: str = CHAMPION, treatment: str = CHALLENGER,
           settings: Settings | None = None) -> dict:
    s = (settings or get_settings()).serve
    arms = summarize(events)
    c, t = arms.get(control, ArmStats(control)), arms.get(treatment, ArmStats(treatment))
    verdict = decide(c, t, metric=metric, alpha=s.ab_alpha if alpha is None else alpha,
                     min_impressions=s.ab_min_impressions if min_impressions is None else min_impressions)
    return {"variants": {v: a.to_dict() for v, a in sorted(arms.items())}, **verdict}


# ---- outcome events ------------------------------------------------------------------------------------
def outcomes_path(settings: Settings | None = None) -> Path:
    s = settings or get_settings()
    return Path(s.serve.outcomes_path) if s.serve.outcomes_path else s.home_dir / "ab" / "outcomes.jsonl"


def outcome_event(*, event_id: str, request_id: str | None, user_id: str, property_id: str, variant: str,
                  model_version: str, outcome: str, timestamp: datetime | str | None = None) -> dict:
    """One `ab_outcomes` event (contracts.md)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    ts = timestamp or datetime.now(UTC)
    return {"event_id": event_id, "request_id": request_id, "user_id": user_id, "property_id": property_id,
            "variant": variant, "model_version": model_version, "outcome": outcome,
            "timestamp": ts.isoformat() if isinstance(ts, datetime) else ts}


def read_outcomes_file(path: str | Path) -> Iterator[dict]:
    p = Path(path)
    if not p.exists():
        return
    with p.open() as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash; the rest is intact


def read_outcomes_kafka(client_config: dict, *, topic: str = "ab_outcomes", idle_s: float = 5.0) -> Iterator[dict]:
    """Every event on the topic from the beginning (own, uncommitted consumer), until idle for idle_s.
    `client_config`: kafka-python connection keywords (bootstrap_servers, security settings)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=int(idle_s * 1000), **client_config)
    try:
        for msg in consumer:
            try:
                yield json.loads(msg.value)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    finally:
        consumer.close()


# ---- aliases -------------------------------------------------------------------------------------------
def promote(settings: Settings | None = None, model_name: str | None = None) -> dict:
    """challenger → champion; the challenger alias is removed; the old champion is recorded in a tag."""
    from rentalml.registry import mlflow_registry as reg

    s = settings or get_settings()
    name = model_name or s.model_name
    client = reg.configure(s)
    challenger = reg.alias_version(CHALLENGER, model_name=name, settings=s)
    if challenger is None:
        raise LookupError(f"{name} has no '{CHALLENGER}' alias: nothing to promote")
    champion = reg.alias_version(CHAMPION, model_name=name, settings=s)
    client.set_registered_model_alias(name, CHAMPION, challenger)
    client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, challenger, PREVIOUS_CHAMPION_TAG, champion or "")
    client.set_model_version_tag(name, challenger, "rentalml.promoted_at", datetime.now(UTC).isoformat())
    return {"action": "promoted", "model": name, "champion": challenger, "previous_champion": champion,
            "challenger": None}


def rollback(settings: Settings | None = None, model_name: str | None = None) -> dict:
    """Stop a running canary (remove the challenger alias); without one, restore the previous champion."""
    from rentalml.registry import mlflow_registry as reg

    s = settings or get_settings()
    name = model_name or s.model_name
    client = reg.configure(s)
    challenger = reg.alias_version(CHALLENGER, model_name=name, settings=s)
    champion = reg.alias_version(CHAMPION, model_name=name, settings=s)
    if challenger is not None:
        client.delete_registered_model_alias(name, CHALLENGER)
        client.set_model_version_tag(name, challenger, "rentalml.rolled_back_at", datetime.now(UTC).isoformat())
        return {"action": "canary_stopped", "model": name, "champion": champion, "removed_challenger": challenger}
    if champion is None:
        raise LookupError(f"{name} has no '{CHAMPION}' alias: nothing to roll back")
    previous = client.get_model_version(name, champion).tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous:
        raise LookupError(f"{name} v{champion} records no previous champion ({PREVIOUS_CHAMPION_TAG} tag): "
                          f"nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, champion, "rentalml.rolled_back_at", datetime.now(UTC).isoformat())
    return {"action": "champion_restored", "model": name, "champion": previous, "demoted": champion}
