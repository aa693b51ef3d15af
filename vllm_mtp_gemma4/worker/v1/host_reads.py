"""Counting a fused step's host reads for real: every call that brings device values to the host.

On a GPU each such call is a synchronisation. On CPU the device is the host, so the counter follows data
instead of devices: it starts from the device tensors the step is given (the target's logits and hidden states,
and the device-side fields of vLLM's spec-decode and attention metadata; fields named ``*_cpu`` are vLLM's host
copies) and from every tensor computed from them. A value read (``.item()``, ``.tolist()``, ``bool()``, a
data-dependent shape) or a transfer (``.cpu()``, ``.to("cpu")``, ``.numpy()``) of such a tensor is a host read.
Uploads of host data and reads of host-side copies are not. Enabled by ``VLLM_MTP_GEMMA4_COUNT_HOST_READS=1``
(a Python call per tensor op).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

COUNT_ENV = "VLLM_MTP_GEMMA4_COUNT_HOST_READS"

_TRANSFERS = {torch.Tensor.cpu, torch.Tensor.numpy}
_VALUE_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
    torch.Tensor.unique, torch.unique,
}


def counting_enabled() -> bool:
    return os.environ.get(COUNT_ENV) == "1"


def device_tensors(*values: Any) -> list[torch.Tensor]:
    """The tensors in ``values``, and in the fields of the dataclasses among them, except ``*_cpu`` fields."""
    found = []
    for value in values:
        if dataclasses.is_dataclass(value):
            fields = [getattr(value, f.name) for f in dataclasses.fields(value) if "cpu" not in f.name]
            found += [t for t in tree_leaves(fields) if isinstance(t, torch.Tensor)]
        else:
            found += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return found


class HostReadCounter(TorchFunctionMode):
    """Inside ``with counter:``, counts host reads of ``device`` tensors and of everything computed from them."""

    def __init__(self, device: list[torch.Tensor]) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self._device = {id(t): t for t in device}  # kept alive for the step, so ids are not reused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(isinstance(t, torch.Tensor) and id(t) in self._device for t in tree_leaves((args, kwargs))):
            return out
        if func in _VALUE_READS or _is_masked_index(func, args):
            self.reads[func.__name__] += 1
        elif self._is_transfer(func, args, kwargs):
            self.reads[func.__name__] += 1
            for t in tree_leaves(out):  # the host copy (on CPU, ``.to("cpu")`` may return the tensor itself)
                if isinstance(t, torch.Tensor):
                    self._device.pop(id(t), None)
        else:
            self._device.update((id(t), t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    @staticmethod
    def _is_transfer(func: Any, args: tuple, kwargs: dict) -> bool:
        if func in _TRANSFERS:
            return True
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            return isinstance(target, str) and torch.device(target).type == "cpu"
        return False


def _is_masked_index(func: Any, args: tuple) -> bool:
    return func is torch.Tensor.__getitem__ and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:]))
