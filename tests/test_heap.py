"""The serving model's heap after a load and a reload (inference.model.settle_heap): what survives a load is frozen
out of the cyclic collector's walks (full collections under load used to stall every request for 50-86 ms, see
docs/benchmarks.md "Soak"), and a reload still releases the old model: freezing must not turn into a leak.

In a process of its own: kserve cannot be imported where tritonclient.grpc already is (see test_serving.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from serving_helpers import make_bundle

CHILD = r"""
import gc, json, sys, weakref
from rentalml.inference.model import RecommenderModel

model = RecommenderModel(sys.argv[1])
model.load()
out = {"frozen_after_load": gc.get_freeze_count()}
old_bundle, old_routing = weakref.ref(model.routing.champion.bundle), weakref.ref(model.routing)
model.reload(champion=sys.argv[2])
out.update(version=model.routing.champion.bundle.model_version, frozen_after_reload=gc.get_freeze_count(),
           old_routing_alive=old_routing() is not None, old_bundle_alive=old_bundle() is not None)
print(json.dumps(out))
"""


def test_load_freezes_and_reload_releases_the_old_model(tmp_path):
    b1, b2 = make_bundle(tmp_path / "b1", "1"), make_bundle(tmp_path / "b2", "2")
    res = subprocess.run([sys.executable, "-c", CHILD, str(b1), str(b2)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["frozen_after_load"] > 10_000  # the model and everything imported, out of the collector's walks
    assert out["version"] == "2"
    assert not out["old_routing_alive"] and not out["old_bundle_alive"]  # released, though it had been frozen
    assert out["frozen_after_reload"] > 10_000  # the new model frozen in its turn
