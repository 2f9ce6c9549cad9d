"""`ml_training_*` metrics of the pipeline steps (the training dashboard and the stale-training alert).

Pipeline steps are short-lived pods, so they push: to the Pushgateway at `settings.monitor.pushgateway_url`
(grouping key job=rentalml-training, step=<step>; Prometheus scrapes it with honor_labels), and always to a
Prometheus textfile `$RENTALML_HOME/monitoring/training-<step>-<what>.prom` for local runs. A push failure is logged and
never fails the step.

  ml_training_step_duration_seconds{step}          wall time of the last run of each step
  ml_training_ndcg_at_10{model}                    test nDCG@10 of the last evaluated model
  ml_training_last_success_timestamp_seconds       when the registering step last succeeded (unix time)
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from rentalml.config import Settings, get_settings

log = logging.getLogger(__name__)
JOB = "rentalml-training"


def push(step: str, *, seconds: float | None = None, ndcg_at_10: float | None = None, model: str | None = None,
         success: bool = False, settings: Settings | None = None) -> Path | None:
    from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway, write_to_textfile

    s = settings or get_settings()
    reg = CollectorRegistry()
    if seconds is not None:
        Gauge("ml_training_step_duration_seconds", "wall time of the pipeline step's last run", ["step"],
              registry=reg).labels(step).set(seconds)
    if ndcg_at_10 is not None:
        Gauge("ml_training_ndcg_at_10", "test nDCG@10 of the last evaluated model", ["model"],
              registry=reg).labels(model or "unknown").set(ndcg_at_10)
    if success:
        Gauge("ml_training_last_success_timestamp_seconds", "unix time of the last successful registration",
              registry=reg).set(time.time())
    out = None
    try:
        suffix = "-".join(n for n, v in (("duration", seconds), ("ndcg", ndcg_at_10), ("success", success or None))
                          if v is not None)
        out = s.home_dir / "monitoring" / f"training-{step}-{suffix}.prom"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(out), reg)
        if s.monitor.pushgateway_url:
            pushadd_to_gateway(s.monitor.pushgateway_url, job=JOB, registry=reg, grouping_key={"step": step},
                            timeout=5)
    except Exception as exc:  # metrics must never fail a training step
        log.warning("training metrics for step %s not pushed: %s", step, exc)
    return out


def timed_step(step: str):
    """Decorator: push the step's duration when it returns."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            push(step, seconds=time.perf_counter() - t0)
            return out

        return inner

    return wrap
