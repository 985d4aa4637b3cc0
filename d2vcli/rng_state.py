"""The random number generators' states a checkpoint saves and a resume restores, and the per-update
seeding that makes dropout a function of (seed, rank, update) rather than of where a run was resumed.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """torch, numpy, python and CUDA RNG states as tensors/lists/numbers (loadable with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def seed_update(seed: int, rank: int, step: int) -> None:
    """Seed torch for update `step` on `rank`: dropout/LayerDrop draws become a function of the update."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))
