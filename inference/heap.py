"""The serving process's heap: glibc malloc's arena and mmap settings at start-up, and what a (re)load leaves.

  tune_malloc   at start-up (and in each spawned REST worker): a fixed `serve.malloc_mmap_threshold`, so a
                reload's freed model goes back to the OS (and `serve.malloc_arena_max` arenas, off by default)
  settle_heap   after a load or reload: collect the old model, freeze the new one out of the cyclic collector,
                trim
  trim_heap     malloc_trim: free pages of every arena back to the OS

On anything but glibc these do nothing (no `mallopt` / `malloc_trim` in the C library)."""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger("rentalml.inference")

# mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both; musl and macOS do not
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(arena_max: int | None = None, mmap_threshold: int | None = None) -> dict:
    """Set glibc's malloc arena limit and mmap threshold (0 leaves glibc's default). Defaults: `serve.*` settings.

    Why, measured with benchmarks/soak.py (240 s at 450 req/s, one reload and one invalidation storm, RSS after
    warm-up to the end; 2026-12-03):
    - glibc's defaults: +12.6 % (+32 MB at the reload, +10 MB at the storm), flat between the events.
    - `M_ARENA_MAX` 2: +6.6 %. The server's threads (gRPC's pool, the event loop, ONNX Runtime, the batcher)
      each get an arena of their own by default (up to 8 per core); what a reload frees is spread over all of
      them, and a partly used arena cannot shrink.
    - `M_MMAP_THRESHOLD` 128 KiB: +5.2 %. glibc's threshold is dynamic: freeing an mmapped block raises it to that
      block's size, so after the first reload the next model's large arrays come from the arenas instead of
      their own mappings, and freeing them no longer returns the memory.
    - both: +7.4 %, no better than the threshold alone, so the arena limit is off by default (0) and the threshold
      on. Latency was the same within noise in all four runs (p50 2.60-2.73 ms, p99 7.8-8.5 ms).
    Setting the threshold also turns off the dynamic adjustment (glibc's mallopt(3)). Returns what was set."""
    from rentalml.config import get_settings

    serve = get_settings().serve
    arena_max = serve.malloc_arena_max if arena_max is None else arena_max
    mmap_threshold = serve.malloc_mmap_threshold if mmap_threshold is None else mmap_threshold
    libc = _libc()
    done: dict = {}
    if libc is None:
        return done
    if arena_max and libc.mallopt(M_ARENA_MAX, int(arena_max)) == 1:
        done["arena_max"] = int(arena_max)
    if mmap_threshold and libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1:
        done["mmap_threshold"] = int(mmap_threshold)
    if done:
        log.debug("malloc: %s", done)
    return done


def settle_heap() -> int:
    """After a (re)load: make the previous model's objects collectable again (gc.unfreeze), collect once, then move
    everything that survived (the loaded bundles, the app, the imported modules) into the permanent generation
    (gc.freeze), where the cyclic collector no longer walks it. Without this every full (generation-2) collection
    walked the whole model while requests waited: 50-86 ms pauses under the soak's load (benchmarks/soak.py,
    2026-12-03), the largest single stall between events. Refcounting still frees frozen objects; a reload
    unfreezes first, so the old model's cycles are collected too. Returns the permanent generation's size."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    trim_heap()
    return gc.get_freeze_count()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). glibc keeps what a
    reload freed (the old model, the bundle's parquet reads) in its arenas, so RSS stayed at the peak: in-process,
    three reloads of the soak's bundle added +31, +27 and +8 MB without the trim and +6, +2 and -1 MB with it
    (2026-12-03, docs/benchmarks.md "Soak")."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
