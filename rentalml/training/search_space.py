"""One hyperparameter search space, used by local Optuna tuning and to generate Katib Experiments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "double" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def distribution(self):
        """The Optuna distribution `suggest` samples from (to record a known point, e.g. the defaults)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "double":
            return FloatDistribution(self.low, self.high, log=self.log)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return CategoricalDistribution(list(self.choices))

    def contains(self, value) -> bool:
        if self.kind in ("double", "int"):
            return self.low <= value <= self.high
        return value in self.choices

    def suggest(self, trial):
        if self.kind == "double":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


SEARCH_SPACE: tuple[Param, ...] = (
    Param("lr", "double", 3e-4, 1e-2, log=True),
    Param("dim", "categorical", choices=(64, 128, 200, 256)),
    Param("layers", "int", 0, 2),
    Param("negatives", "categorical", choices=(512, 1024, 2048, 4096)),
    Param("weight_decay", "double", 1e-9, 1e-4, log=True),
    Param("batch_size", "categorical", choices=(128, 256, 512)),
    Param("input_dropout", "double", 0.2, 0.7),
)


def suggest(trial) -> dict:
    return {p.name: p.suggest(trial) for p in SEARCH_SPACE}
