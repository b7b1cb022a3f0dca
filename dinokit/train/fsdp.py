"""Fully Sharded Data Parallel (FSDP2, ``fully_shard``) for models too large to replicate.

Each transformer block and the whole model are sharded, student and teacher alike, so their
parameters shard identically and the EMA can run shard by shard. Checkpoints and the kNN
monitor gather full state dicts (a collective: every rank calls these functions).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from dinokit.models.ssl import SSLModel

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: SSLModel) -> SSLModel:
    for block in model.backbone.blocks:
        fully_shard(block)
    # The root too reshards after forward: the teacher never runs a backward, and its EMA update
    # must see the same local shards as the student's.
    fully_shard(model, reshard_after_forward=True)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """The process's own shard of a (possibly) sharded tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=_FULL) if sharded else model.state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_FULL) if sharded else optimizer.state_dict()


def load_full_state(model: nn.Module, state: dict, sharded: bool, optimizer=None, optim_state=None) -> None:
    if sharded:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
