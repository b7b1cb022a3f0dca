"""RNG state for checkpoints, as plain tensors and lists so ``weights_only`` loading accepts it.

Writing and loading the checkpoint file itself (atomically; never running code) is the run
folder's job: :func:`dinokit.runs.save_atomic`, :func:`dinokit.runs.load_checkpoint`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """RNG states as plain tensors / lists (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
