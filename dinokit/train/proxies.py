"""GPU-speed proxies that a CPU can measure: host syncs, saved-for-backward bytes, FLOPs.

A GPU is lent to few sessions, so the training step's GPU behaviour is held by numbers the CPU
measures exactly:

* **host syncs** (:class:`SyncCounter`): ops after which the host must wait for the device
  (reading a value, or an output whose size depends on values). Each leaves a GPU idle while
  Python catches up; a training step between log steps should have none.
* **saved-for-backward bytes** (:func:`saved_bytes`): what autograd keeps alive until the
  backward, which sets the peak memory of a step (measured on the CPU at batch 2, it predicted
  the H200's peak at batch 64 within 3 %).
* **FLOPs** (``torch.utils.flop_counter``), for MFU against a device's peak.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device: value reads, and outputs sized by values.
SYNC_OPS = {
    "aten._local_scalar_dense",  # .item(), float(), int(), bool(), if tensor:
    "aten.nonzero",  # boolean indexing, torch.where(cond) with one argument
    "aten.masked_select",
    "aten.is_nonzero",
    "aten.equal",
    "aten.unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # without output_size
}


class SyncCounter(TorchDispatchMode):
    """Counts the host-syncing ops run inside it, and device-to-host copies (``.cpu()``,
    ``.tolist()`` on a GPU tensor); ``syncs`` maps op name to count."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNC_OPS or (name == "aten.index" and _has_bool_index(args)):
            self.syncs[name] += 1
        elif name in ("aten._to_copy", "aten.copy_") and _device_to_host(name, args, kwargs):
            self.syncs[f"{name} (device to host)"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.syncs.values())


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(t is not None and t.dtype == torch.bool for t in indices)


def _device_to_host(name: str, args, kwargs) -> bool:
    if name == "aten._to_copy":
        src, dst = args[0], kwargs.get("device")
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    dst, src = args[0], args[1]
    return src.device.type != "cpu" and dst.device.type == "cpu"


def count_syncs(fn: Callable[[], object]) -> Counter[str]:
    """The host syncs of one call of ``fn``."""
    with SyncCounter() as counter:
        fn()
    return counter.syncs


def is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (a leaf that requires grad: a model input counts too)."""
    base = t if t._base is None else t._base
    return base.is_leaf and base.requires_grad


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of distinct storages autograd saves for the backward while ``fn`` runs its forward:
    what it keeps alive beyond the parameters (which are resident anyway)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_parameter(t):  # resident anyway
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
