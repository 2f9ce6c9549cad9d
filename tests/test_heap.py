"""The serving model's heap after a load and a reload (inference.heap.settle_heap): what survives a load is frozen
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


MALLOC_CHILD = r"""
import ctypes, json, re, sys, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.open_memstream.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    from rentalml.inference.heap import tune_malloc
    done = tune_malloc(arena_max=2)  # the server's threshold (serve.malloc_mmap_threshold) and the opt-in limit
    assert done == {"arena_max": 2, "mmap_threshold": 128 * 1024}, done

# a model-sized block freed, then the next one: mapped of its own (hblkhd) or carved from an arena
first = libc.malloc(8 << 20)
libc.free(first)
second = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblkhd

# threads that malloc at once (ctypes calls drop the GIL): each new thread gets an arena until the limit
go, hold = threading.Barrier(8), []
def worker():
    go.wait()
    hold.append(libc.malloc(4096))
threads = [threading.Thread(target=worker) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
buf = ctypes.c_char_p()
size = ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
arenas = len(re.findall(r'<heap nr="\d+">', buf.value.decode()))
print(json.dumps({"second_block_mapped": mapped >= (8 << 20), "arenas": arenas}))
"""


def malloc_state(mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", MALLOC_CHILD, mode], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_tune_malloc_limits_arenas_and_keeps_large_blocks_mapped():
    """glibc's defaults, side by side with `rentalml serve`'s start-up (inference.heap.tune_malloc): by default
    a freed 8 MB block raises the mmap threshold (the next one comes from an arena and stays in RSS once freed)
    and every new thread gets an arena; tuned, large blocks keep their own mappings, and with
    `serve.malloc_arena_max` 2 at most 2 arenas exist."""
    default, tuned = malloc_state("default"), malloc_state("tuned")
    assert not default["second_block_mapped"] and default["arenas"] > 2  # what the soak's +12.6 % came from
    assert tuned["second_block_mapped"] and tuned["arenas"] <= 2


def test_runtime_sessions_run_without_the_ort_arena(tmp_path):
    """Every ONNX Runtime session the runtime opens (rentalml.runtime.bundle.onnx_session: the scorer, the two
    stages, the fold-in graph) has ORT's CPU arena off: the arena grows to the largest batch a session has run
    and keeps it, which is what a storm's batches of misses left in the soak's RSS (docs/benchmarks.md "Soak")."""
    from rentalml.runtime.bundle import Bundle, onnx_session
    from rentalml.runtime.two_stage import TwoStage

    path = make_bundle(tmp_path / "b", "1")
    bundle = Bundle(path)
    assert bundle.session.get_session_options().enable_cpu_mem_arena is False
    two_stage = TwoStage(path)
    for graph in ("retrieval", "ranker"):
        options = onnx_session(path / two_stage.meta[graph]).get_session_options()
        assert options.enable_cpu_mem_arena is False and options.intra_op_num_threads == 1
