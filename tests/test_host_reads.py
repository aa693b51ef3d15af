"""The host-read counter (``worker/host_reads.py``) that ``test_one_host_read_per_fused_step`` relies on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_mtp_gemma4.worker.v1.host_reads import HostReadCounter, device_tensors


@dataclass
class _Metadata:
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor


def test_reads_of_device_values_count_and_host_copies_do_not():
    logits = torch.randn(4, 10)
    metadata = _Metadata(torch.tensor([3, 5, 2, 7]), torch.tensor([3, 5, 2, 7]))
    with HostReadCounter(device_tensors(logits, metadata)) as counter:
        top = logits.argmax(dim=-1)
        upload = torch.from_numpy(metadata.seq_lens_cpu.numpy()).to(logits.device)  # host data going up
        _ = (top + upload).tolist()  # computed from a device value: a read
        _ = int(metadata.seq_lens.max())  # a device field: a read
        _ = metadata.seq_lens_cpu.max().item()  # vLLM's host copy: not a read
        host = torch.cat([top, metadata.seq_lens]).to("cpu")  # the one transfer
        _ = host[:4].tolist(), host[4:].sum().item()  # already on the host: not reads
        _ = logits[logits > 0]  # a data-dependent shape: a read
    assert counter.reads == {"tolist": 1, "__int__": 1, "to": 1, "__getitem__": 1}


def test_nothing_is_counted_outside_the_block():
    logits = torch.randn(2, 3)
    counter = HostReadCounter(device_tensors(logits))
    with counter:
        _ = logits.sum().item()
    _ = logits.sum().item()  # the same read after the block
    assert counter.reads == {"item": 1}
