"""Shared by the serving tests: a small model bundle, a real `rentalml serve` subprocess, ports."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from rentalml.services import (
    free_port,  # noqa: F401 - tests import it from here
    wait_until,
)

MODEL = "rental-recommender"


@functools.lru_cache(maxsize=1)
def _fitted():
    from rentalml.data.generator import generate_marketplace
    from rentalml.training.trainer import fit_model

    ds = generate_marketplace(n_users=300, n_properties=200, n_events=6000, seed=1)
    return fit_model("hybrid", ds, params={"epochs": 5, "neighbours": 32}), ds


def make_bundle(out: Path, version: str) -> Path:
    """A bundle of one small hybrid fit (trained once per test session), stamped with `version`."""
    from rentalml.export.bundle import write_bundle

    fitted, ds = _fitted()
    return write_bundle(fitted, ds, out, model_version=version)


def warm_users(bundle: Path) -> list[str]:
    users = pd.read_parquet(bundle / "users.parquet")
    return users[users["history"].map(len) > 0]["user_id"].astype(str).tolist()


class Server:
    """`rentalml serve` in a subprocess with its own RENTALML_HOME (impressions, registry) unless env sets one."""

    def __init__(self, bundle: Path | None, log: Path, *extra: str, env: dict | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log = log
        self.home = Path(tempfile.mkdtemp(prefix="rentalml-serve-", dir=log.parent))
        self.env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "RENTALML_HOME": str(self.home), **(env or {})}
        cmd = [sys.executable, "-c", "from rentalml.cli import app; app()", "serve",
               *(["--bundle", str(bundle)] if bundle is not None else []),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *extra]
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=self.env)
        self.url = f"http://127.0.0.1:{self.http_port}"

    @property
    def outcomes(self) -> Path:
        return Path(self.env["RENTALML_HOME"]) / "ab" / "outcomes.jsonl"

    def wait_ready(self, timeout: float = 90.0) -> None:
        import tritonclient.grpc as grpcclient

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")

        def ready() -> bool:
            try:
                return (httpx.get(f"{self.url}/v2/models/{MODEL}/ready", timeout=1).status_code == 200
                        and grpc.is_server_ready())
            except Exception:  # httpx and tritonclient errors while the server starts
                return False

        try:
            wait_until(ready, timeout, interval=0.2, proc=self.proc, what="the server's REST and gRPC readiness")
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}:\n{self.log.read_text()[-4000:]}") from None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self._log_fh.close()
        return self.proc.returncode


def v2_infer(client, module, user_ids, k=None, headers=None):
    inp = module.InferInput("user_id", [len(user_ids)], "BYTES")
    inp.set_data_from_numpy(np.array(user_ids, dtype=object))
    inputs = [inp]
    if k is not None:
        kin = module.InferInput("k", [1], "INT32")
        kin.set_data_from_numpy(np.array([k], dtype=np.int32))
        inputs.append(kin)
    return client.infer(MODEL, inputs, headers=headers)


def v2_params(result, grpc: bool) -> dict:
    resp = result.get_response()
    if not grpc:
        return resp["parameters"]
    return {key: p.string_param for key, p in resp.parameters.items()}
