"""Counter-based randomness and the processed target distribution p~ that sampled verification draws from."""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GREEDY_TEMPERATURE = 1e-5
"""Rows with a temperature below this are greedy: their p~ is a point mass on the (first) argmax."""

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # added every round: lowbias32(0) == 0, so zero words must still move the state


class SamplingTensors(NamedTuple):
    """Per-row sampling parameters, each of shape [B]."""

    temperature: Tensor  # float; below GREEDY_TEMPERATURE: greedy
    top_k: Tensor | None  # int; <= 0 or >= V: off; None: off for every row
    top_p: Tensor | None  # float in (0, 1]; >= 1: off; None: off for every row
    min_p: Tensor | None  # float in [0, 1]; 0: off; None: off for every row
    seed: Tensor | np.ndarray  # int64, any value (on the host, the noise is computed there: see uniform_noise)


Ints = TypeVar("Ints", Tensor, np.ndarray)


def uniform_noise(seed: Ints, counter: Ints, stream: int = 0) -> Ints:
    """Float64 uniforms in (0, 1] with 53 random bits that depend only on (seed, counter, stream), never on the batch
    around them. 53 bits (not float32's 23) because a token of probability below 2**-23 must still be drawn with its
    own probability, at Gemma 4's vocabulary of 262,144.

    seed[B] is broadcast over the trailing dims of counter[B, ...] (int64, e.g. the absolute position of the token
    being drawn). ``stream`` separates independent uses at the same position (a draw vs. an accept test).
    The hash keeps a 64-bit state as two 32-bit lanes held in int64 tensors, so no product ever overflows and the
    bits are identical on CPU and GPU. One 32-bit lane alone would make rows' sequences shifted copies of each
    other (seed x, stream 1 = seed x^1, stream 0); the second lane, fed from the first, breaks that.

    It takes int64 torch tensors (any device) or numpy arrays alike, with the same bits. The fused step passes host
    arrays, where seeds and positions already are: numpy runs the ~225 elementwise ops on [B, K+1] in a third of
    torch's time on CPU, and a GPU gets one upload instead of ~225 tiny kernels.
    """
    host = isinstance(counter, np.ndarray)
    seed = seed.reshape(tuple(seed.shape) + (1,) * (counter.ndim - seed.ndim))
    if host:  # uint64: a 32 x 32-bit product fits, so _mul32 is one multiply (the same bits, half the ops)
        seed, counter = seed.astype(np.uint64), counter.astype(np.uint64)
    else:
        seed, counter = seed.long(), counter.long()
    a: Ints | int = 0
    b: Ints | int = 0
    words = (seed & _MASK32, (seed >> 32) & _MASK32, counter & _MASK32, (counter >> 32) & _MASK32, stream & _MASK32)
    for word in words:
        a = _lowbias32(((a ^ word) + _GOLDEN32) & _MASK32)
        b = _fmix32(((b ^ word) + a) & _MASK32)
    # 53 random bits (32 from one lane, 21 from the other) as multiples of 2**-53 in (0, 1]: exact in float64, never 0.
    bits = ((a << 21) | (b >> 11)) + 1
    return (bits.astype(np.float64) if host else bits.double()) * 2.0**-53


def _mul32(x: Ints, c: int) -> Ints:
    """(x * c) mod 2**32 for x in [0, 2**32). In int64 (torch) c is split in 16-bit halves so every partial product
    fits; in uint64 (numpy) the whole product does."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint64:
        return (x * np.uint64(c)) & _MASK32
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _lowbias32(x: Ints) -> Ints:
    """C. Wellons' lowbias32: a 32-bit bijection with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _fmix32(x: Ints) -> Ints:
    """MurmurHash3's finalizer: another 32-bit bijection, so the two lanes do not mirror each other."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def process_logits(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor | None,
    top_p: Tensor | None,
    min_p: Tensor | None,
    max_top_k: int | None = None,
) -> Tensor:
    """p~[B, ..., V] (float32, rows sum to 1) from logits[B, ..., V] and per-row parameters [B].

    Order, as in vLLM's sampler: temperature, then min_p (keep p >= min_p * p_max), then top-k, then top-p on the
    top-k renormalized mass (keep the smallest prefix, in decreasing probability, whose mass reaches top_p).
    Top-k and top-p keep every token tied with the last one kept, so the result never depends on sort order.
    Greedy rows get a one-hot on ``argmax`` (first index on ties), the token greedy verification emits.
    ``None`` for top_k, top_p or min_p means no row uses it, and skips its work (the sort, for top-k/top-p).
    ``max_top_k``, known on the host, bounds every row's top_k: a partial top-k then replaces the full sort
    (5x cheaper on CPU at V=4096). Top-p mass then ignores tokens tied with the k-th one beyond it.
    """
    logits = logits.float()
    greedy = _per_row(temperature < GREEDY_TEMPERATURE, logits)
    scale = torch.where(greedy, 1.0, _per_row(temperature.float(), logits))
    probs = torch.softmax(logits / scale, dim=-1)
    if min_p is not None:
        probs = probs * (probs >= _per_row(min_p, logits) * probs.amax(-1, keepdim=True))
    if top_k is not None or top_p is not None:
        top_k = torch.zeros_like(temperature, dtype=torch.long) if top_k is None else top_k
        top_p = torch.ones_like(temperature, dtype=torch.float) if top_p is None else top_p
        threshold = _top_k_top_p_threshold(probs, _per_row(top_k, logits), _per_row(top_p, logits), max_top_k)
        probs = probs * (probs >= threshold)
    probs = probs / probs.sum(-1, keepdim=True)
    # A bool one-hot (not F.one_hot's int64): 1 byte per element instead of 12 with its float copy.
    one_hot = torch.arange(logits.shape[-1], device=logits.device) == logits.argmax(-1, keepdim=True)
    return torch.where(greedy, one_hot, probs)


def _per_row(x: Tensor, like: Tensor) -> Tensor:
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def _top_k_top_p_threshold(probs: Tensor, top_k: Tensor, top_p: Tensor, max_top_k: int | None) -> Tensor:
    """[..., 1] smallest probability that top-k then top-p keep."""
    vocab = probs.shape[-1]
    if max_top_k is not None and 0 < max_top_k < vocab:
        ordered = probs.topk(max_top_k, dim=-1).values
        top_k = top_k.clamp(max=max_top_k)
    else:
        ordered = probs.sort(dim=-1, descending=True).values
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k).long()
    kth = ordered.gather(-1, (k - 1).expand(*ordered.shape[:-1], 1))
    ordered = ordered * (ordered >= kth)
    # Exclusive cumsum: a token is kept while the mass strictly before it is below top_p.
    mass_before = F.pad(ordered.cumsum(-1)[..., :-1], (1, 0))
    keep = (mass_before < top_p * ordered.sum(-1, keepdim=True)) | (top_p >= 1)
    last = ordered.gather(-1, keep.sum(-1, keepdim=True).clamp(min=1) - 1)
    # With top-p off `last` can be a token top-k already dropped, so the top-k bound still applies.
    return torch.maximum(kth, last)


def sample_from_probs(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: int64 tokens[...] from unnormalized probs[..., V] and uniforms[...] in (0, 1].

    The left search returns the first token whose CDF reaches ``u * total``; since u > 0, a token of probability
    zero is never drawn. The CDF is summed in float64: in float32 its step near 1 is 6e-8, so at V = 262,144 tokens
    of probability below about 1e-7 would be drawn with the wrong probability (0 or one step). It is summed in
    place on the float64 copy: one [..., V] float64 array, not two.
    """
    cdf = probs.to(torch.float64, copy=True).cumsum_(-1)
    return torch.searchsorted(cdf, uniforms.unsqueeze(-1) * cdf[..., -1:]).squeeze(-1)


def draw_tokens(logits: Tensor, rows: Tensor, temperature: Tensor, top_k: Tensor | None, top_p: Tensor | None,
                min_p: Tensor | None, uniforms: Tensor, max_top_k: int | None = None) -> Tensor:
    """tokens[R]: draw n from p~ of logits[rows[n]] (logits[N, V]) with the parameters and uniforms[n] at n ([R]
    each): ``sample_from_probs(process_logits(...))``, ``draw_chunk(V)`` rows at a time, so no temporary grows with
    R x V (``draw_bound_bytes``). Every step is row by row, so the draws are those of one call over all rows, bit
    for bit."""
    step = draw_chunk(logits.shape[-1])
    tokens = []
    for lo in range(0, rows.shape[0], step):
        part = slice(lo, lo + step)
        probs = process_logits(logits[rows[part]], temperature[part], _part(top_k, part), _part(top_p, part),
                               _part(min_p, part), max_top_k)
        tokens.append(sample_from_probs(probs, uniforms[part]))
        del probs  # before the next chunk: one chunk's temporaries alive at a time
    if not tokens:
        return rows.new_zeros(0, dtype=torch.long)
    return torch.cat(tokens)


def _part(x: Tensor | None, part: slice) -> Tensor | None:
    return None if x is None else x[part]


DRAW_CHUNK_BYTES = 1 << 25
"""Bound on one float32 [rows, V] array of a ``draw_tokens`` chunk (32 MiB: 32 rows at V = 262,144). Not smaller:
glibc serves blocks under 32 MiB from its heap once one was freed, and at 16 MiB the resident set then grew with the
number of chunks (0.7 GB at B = 256, K = 4) where blocks of 32 MiB go back to the system at once."""


def draw_chunk(vocab_size: int) -> int:
    """Rows per chunk of ``draw_tokens`` at this vocabulary size."""
    return max(1, DRAW_CHUNK_BYTES // (4 * vocab_size))


def draw_bound_bytes(vocab_size: int) -> int:
    """What ``draw_tokens`` holds at most beside its inputs, counted in float32 [chunk, V] arrays: the gathered
    rows, the probabilities, and at the full sort that top-p needs its values, int64 indices (2) and the stable
    sort's buffer of both (3), with the scaled logits or a cumulative mass (1): 10, and two bool masks (1 byte an
    element each). The float64 CDF (2) comes after the sort's arrays are gone."""
    return draw_chunk(vocab_size) * vocab_size * (10 * 4 + 2)


def add_logit_bias(logits: Tensor, positions: Tensor, counts: Tensor, token_ids: Tensor, values: Tensor) -> Tensor:
    """OpenAI's ``logit_bias``, in place, on logits[N, V] in vLLM's flat spec-decode layout.

    Row b owns the flat positions positions[b, :counts[b]] (positions[B, P], as ``verify.head_indices`` gives them:
    slots past a row's own repeat its last position) and adds values[b, w] at token_ids[b, w] (token_ids, values
    [B, W], padded with value 0). Padding and the slots past counts[b] add 0, so nothing here depends on the data's
    shape: no host read. Called on the raw logits, before penalties, as vLLM's sampler orders it.
    """
    valid = torch.arange(positions.shape[1], device=positions.device) < counts[:, None]
    added = values[:, None, :].to(logits.dtype) * valid[:, :, None]
    index = (positions[:, :, None].expand_as(added), token_ids[:, None, :].expand_as(added))
    return logits.index_put_(index, added, accumulate=True)
