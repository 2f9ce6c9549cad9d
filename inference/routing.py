"""A/B routing: which loaded model version (arm) answers which user.

The champion serves everyone outside the canary; with a challenger and `challenger_percent` > 0, a sticky share of
users (rentalml.evaluation.ab.assign_variant: a hash of salt + user id) is served by the challenger. A `Routing`
is immutable and replaced as a whole on reload, so a request keeps the one it started with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rentalml.evaluation.ab import CHALLENGER, assign_variant
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.interfaces import Recommendations
from rentalml.runtime.pipeline import Engine


@dataclass(frozen=True, eq=False)
class Arm:
    """One loaded model version behind an A/B arm."""

    arm: str  # "champion" | "challenger"
    label: str  # the variant reported in responses, metrics and outcome events
    bundle: Bundle
    source: str  # bundle directory (or registry alias) it came from
    registry_version: str | None = None  # set when the bundle came from the MLflow registry
    engine: Engine | None = None  # the runtime pipeline of this version (rentalml.runtime.pipeline)

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def model_type(self) -> str:
        return self.bundle.model_type


@dataclass(frozen=True)
class Routing:
    """The arms and the split."""

    champion: Arm
    challenger: Arm | None = None
    challenger_percent: float = 0.0
    salt: str = ""

    @property
    def split(self) -> bool:
        """Whether any user goes to the challenger."""
        return self.challenger is not None and self.challenger_percent > 0

    def arm_of(self, user_id: str) -> Arm:
        if not self.split:
            return self.champion
        return self.challenger if assign_variant(user_id, self.salt, self.challenger_percent) == CHALLENGER \
            else self.champion

    def arms_of(self, user_ids: list[str]) -> tuple[list[Arm], dict[Arm, Sequence[int]]]:
        """Each user's arm, and the row numbers per arm."""
        n = len(user_ids)
        if not self.split:
            return [self.champion] * n, {self.champion: range(n)}
        arms = [self.arm_of(u) for u in user_ids]
        groups: dict[Arm, list[int]] = {}
        for i, arm in enumerate(arms):
            groups.setdefault(arm, []).append(i)
        return arms, groups

    def describe(self) -> dict:
        ch = self.challenger
        return {"champion": {"variant": self.champion.label, "model_version": self.champion.model_version,
                             "source": self.champion.source},
                "challenger": None if ch is None else {"variant": ch.label, "model_version": ch.model_version,
                                                       "source": ch.source},
                "challenger_percent": self.challenger_percent if ch is not None else 0.0}

    def without_engines(self) -> Routing:
        """This routing with the arms' engines dropped (they hold connections: rebuilt per process)."""
        return self.with_engines(lambda arm: None)

    def with_engines(self, make) -> Routing:
        """This routing with each arm's engine set to `make(arm)`."""
        def arm(a: Arm | None) -> Arm | None:
            return None if a is None else Arm(a.arm, a.label, a.bundle, a.source, a.registry_version, make(a))

        return Routing(arm(self.champion), arm(self.challenger), self.challenger_percent, self.salt)


@dataclass
class RoutedRecommendations(Recommendations):
    """The runtime's result type with, per row, the arm that answered it."""

    variants: list[str] = field(default_factory=list)  # per row
    versions: list[str] = field(default_factory=list)  # per row
    arms: list[Arm] = field(default_factory=list)  # per row

    def uniform(self, values: list[str]) -> str:
        return values[0] if len(set(values)) == 1 else ",".join(values)
