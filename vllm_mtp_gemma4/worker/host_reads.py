"""Counting a fused step's host reads for real: every call that brings tensor values from the device to Python.

On a GPU each is a synchronisation. On CPU the device is the host, so the counter follows provenance instead:
a transfer (``.cpu()``, ``.to("cpu")``, ``.numpy()``) or a value read (``.item()``, ``.tolist()``, ``bool()``,
a data-dependent shape) counts unless every tensor it touches came out of an earlier counted transfer.
Enabled by ``VLLM_MTP_GEMMA4_COUNT_HOST_READS=1`` (it costs a Python call per tensor op).
"""

from __future__ import annotations

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


class HostReadCounter(TorchFunctionMode):
    """Counts host reads made inside ``with counter:``; ``reads`` names each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self._host: dict[int, torch.Tensor] = {}  # tensors already on the host, kept alive for the step

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = bool(tensors) and all(id(t) in self._host for t in tensors)
        if on_host or self._is_transfer(func, args, kwargs):
            if not on_host:
                self.reads[func.__name__] += 1
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._host[id(t)] = t
        elif func in _VALUE_READS or (func is torch.Tensor.__getitem__ and _has_bool_mask(args)):
            self.reads[func.__name__] += 1
        return out

    @staticmethod
    def _is_transfer(func: Any, args: tuple, kwargs: dict) -> bool:
        if func in _TRANSFERS:
            return True
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
        return False


def _has_bool_mask(args: tuple) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:]))
