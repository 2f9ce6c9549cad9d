"""Import Feast without its two import-time costs, for every rentalml process that uses it (serving's engine, the
stream processor, the pipeline's feature step, the demo, the CLI).

Measured on this 2-core machine (`import feast` + FeatureStore + RepoConfig in a fresh process, two runs each,
docs/architecture.md "Test time"): 5.6-6.6 CPU-s and 358 MB RSS as Feast 0.67 ships, 1.4 CPU-s and 178 MB with
both changes below:

* **torch.** `feast.torch_wrapper` imports torch at Feast's import (~2 CPU-s, ~180 MB), only so that three
  `to_tensor`-style helpers can return tensors (upstream: feast-dev/feast-workshop#23, "Import time of the library
  is high", 2.7 s -> 15 s with PyTorch installed). Serving and the stream processor never call them. The module is
  replaced by one with the same `get_torch()` that imports torch on first call.
* **typeguard.** Feast decorates its classes with `typeguard.typechecked`, which (typeguard 4) re-parses and
  recompiles each decorated function's source at import (~3 CPU-s for Feast's 242 functions). typeguard's own
  switch is Python's optimised mode: under `-O` the decorator returns its target unchanged. The same no-op is used
  here, for Feast only (no other installed package imports typeguard), unless `RENTALML_FEAST_TYPECHECK=1`:
  `tests/test_feast_import.py` loads the project's feature definitions with the checks on, so a wrong argument
  type in feature_repo/ still fails the tests.

`lean()` must run before the first `feast` import of the process; `rentalml.features.store` calls it when it is
imported, and every Feast use in rentalml goes through that module first.
"""

from __future__ import annotations

import os
import sys
import types

TYPECHECK_ENV = "RENTALML_FEAST_TYPECHECK"


def _lazy_torch_wrapper() -> types.ModuleType:
    mod = types.ModuleType("feast.torch_wrapper", "feast.torch_wrapper, torch imported on first use (rentalml)")

    def get_torch():
        import torch  # noqa: PLC0415 - the point of the module

        return torch

    def __getattr__(name: str):  # Feast's TORCH_AVAILABLE, answered when asked
        if name == "TORCH_AVAILABLE":
            try:
                get_torch()
            except Exception:  # noqa: BLE001 - what Feast's own module catches (CUDA libraries missing too)
                return False
            return True
        raise AttributeError(name)

    mod.get_torch = get_torch
    mod.__getattr__ = __getattr__
    return mod


def _no_typecheck(target=None, **_options):
    """typeguard.typechecked as it behaves under `python -O`."""
    if target is None:
        return lambda t: t
    return target


def lean() -> bool:
    """Prepare the process's Feast import; False (nothing done) when Feast is already imported."""
    if "feast" in sys.modules:
        return False
    sys.modules.setdefault("feast.torch_wrapper", _lazy_torch_wrapper())
    if os.environ.get(TYPECHECK_ENV) != "1":
        import typeguard

        typeguard.typechecked = _no_typecheck
    return True
