"""GPU checks of the plugin's pure ops at real Gemma 4 shapes: parity with CPU, and fused vs unfused time.

    python benchmarks/gpu_ops.py                          # on a CUDA machine, about 3 minutes on one H200
    python benchmarks/gpu_ops.py --device cpu --small     # smoke run of the script itself, anywhere

Needs only torch and this package's ``ops`` (no vLLM import), so it runs where vLLM cannot be installed.
For vocab 262,144, B in {1, 8, 64} and K in {1, 4, 7}, it builds one step's inputs on the
CPU from a fixed seed (half the rows greedy, half sampled at T=0.8, top-k 64, top-p 0.9, rows in a thinking
block relaxed) and runs V1's fused verification (thinking flags, then greedy, sampled and relaxed rows in one
``verify_step``, then the accepted rows), and the V2 relaxed-acceptance logits processor's ops on the same rows
flattened (thinking state advanced by the last step's tokens, the relaxed rule, forcing):
- parity: the same step on the CPU and on the device, token for token;
- time: the step eager op by op (the unfused reference) against the same step under ``torch.compile``
  with CUDA graphs (``mode="reduce-overhead"``), as a ratio; the V2 processor's ops, eager; the inverse-CDF
  draw alone in float64 (what runs) against float32 (what it replaced), for the cost of exact tail draws; and the
  counter-based noise made on the host with numpy and uploaded (what the V1 fused step runs) against the same
  bits made on the device, op by op.
Writes JSON (date, device, figures) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from vllm_mtp_gemma4.ops import (
    RelaxedInputs,
    SamplingTensors,
    accepted_rows,
    advance_thinking,
    force_relaxed_drafts,
    process_logits,
    sample_from_probs,
    thinking_flags,
    uniform_noise,
    verify_step,
)

OPEN_THINKING, CLOSE_THINKING, RELAXED_TOPK, RELAXED_DELTA = 7, 8, 10, 0.6
HISTORY = 2048


def make_inputs(batch: int, k: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=gen) * 4
    noisy = logits[:, :k] + torch.randn(batch, k, vocab, generator=gen) * 2
    greedy = torch.arange(batch) % 2 == 0
    return {
        "new_tokens": torch.randint(0, vocab, (batch,), generator=gen),
        "logits": logits,
        "drafts": noisy.argmax(-1),  # drafts that agree with the target often, not always
        "num_drafts": torch.full((batch,), k),
        "temperature": torch.where(greedy, 0.0, 0.8),
        "top_k": torch.full((batch,), 64),
        "top_p": torch.full((batch,), 0.9),
        "min_p": torch.zeros(batch),
        "seed": torch.arange(batch) * 7919 + 1,
        "positions": 100 + torch.arange(k + 1).expand(batch, k + 1),
        "in_thinking": (torch.arange(batch) % 4 == 1)[:, None].expand(batch, k + 1).clone(),
        "topk": torch.full((batch,), RELAXED_TOPK),
        "delta": torch.full((batch,), RELAXED_DELTA),
        "strict_ids": torch.tensor([1, 6, CLOSE_THINKING]),
        "history": torch.randint(0, 16, (batch, HISTORY), generator=gen),
    }


def step(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """V1's verification of one speculative step (``worker/v1/verifier.py``; the forwards excluded)."""
    merged = torch.cat([x["new_tokens"][:, None], x["drafts"]], 1)
    in_thinking = thinking_flags(x["in_thinking"][:, 0], merged[:, :-1], OPEN_THINKING, CLOSE_THINKING)
    sampling = SamplingTensors(x["temperature"], x["top_k"], x["top_p"], x["min_p"], x["seed"])
    relaxed = RelaxedInputs(in_thinking, x["temperature"] > 0, x["topk"], x["delta"], x["strict_ids"])
    verification = verify_step(x["logits"], x["drafts"], x["num_drafts"], sampling, x["positions"], relaxed)
    return verification.num_accepted, accepted_rows(x["drafts"], verification)


def v2_relaxed_step(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What ``worker/v2/relaxed.py`` runs per step: each request's thinking state advanced by the K + 1 tokens it
    committed last step (a window of its history, never all of it), then ``force_relaxed_drafts`` on the
    [B*(K+1)] logits rows, each judging the next."""
    batch, width, vocab = x["logits"].shape
    logits = x["logits"].reshape(-1, vocab).clone()
    upto = torch.full((batch,), HISTORY - 1, device=logits.device)
    start = upto - width
    window = x["history"][:batch].gather(1, start[:, None] + torch.arange(width, device=logits.device))
    inside, _ = advance_thinking(x["in_thinking"][:, 0], upto - width, window, start, upto, OPEN_THINKING,
                                 CLOSE_THINKING)
    tokens = torch.cat([x["new_tokens"][:, None], x["drafts"]], 1).reshape(-1)
    local = torch.arange(width, device=logits.device).repeat(batch)
    per_row = lambda t: t.repeat_interleave(width, 0)  # noqa: E731
    forced = force_relaxed_drafts(logits, tokens, local, per_row(inside), per_row(torch.ones_like(inside)),
                                  per_row(x["topk"]), per_row(x["delta"]), x["strict_ids"], batch * (width - 1),
                                  OPEN_THINKING, CLOSE_THINKING)
    return logits.argmax(-1), forced


def draw(x: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The inverse-CDF draw alone, its CDF summed in ``dtype``."""
    probs = process_logits(x["logits"], x["temperature"], None, None, None)
    uniforms = uniform_noise(x["seed"], x["positions"])
    if dtype == torch.float64:
        return sample_from_probs(probs, uniforms)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (uniforms.float().unsqueeze(-1) * cdf[..., -1:])).squeeze(-1)


def host_noise(x: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The noise as the V1 fused step makes it: numpy on the host (seeds and positions live there), one upload."""
    noise = uniform_noise(x["seed_host"], x["positions_host"])
    return torch.from_numpy(noise).to(device, non_blocking=True)


def time_ms(fn, x: dict[str, torch.Tensor], device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="vocab 4,096: a smoke run")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_ops.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    vocab = 4096 if args.small else 262_144
    compiled = torch.compile(step, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)
    rows = []
    for batch in (1, 8, 64):
        for k in (1, 4, 7):
            cpu_inputs = make_inputs(batch, k, vocab)
            reference = step(cpu_inputs)
            x = {name: t.to(device) for name, t in cpu_inputs.items()}
            host = {"seed_host": cpu_inputs["seed"].numpy(), "positions_host": cpu_inputs["positions"].numpy()}
            noise_parity = bool(torch.equal(host_noise(host, device), uniform_noise(x["seed"], x["positions"])))
            v2_parity = all(torch.equal(a, b.cpu()) for a, b in zip(v2_relaxed_step(cpu_inputs), v2_relaxed_step(x)))
            on_device = [t.cpu() for t in step(x)]
            parity = {name: bool(torch.equal(a, b)) for name, a, b in
                      zip(("num_accepted", "accepted_rows"), reference, on_device)}
            compiled_out = [t.cpu() for t in compiled(x)]
            unfused, fused = time_ms(step, x, device, args.iters), time_ms(compiled, x, device, args.iters)
            rows.append({"batch": batch, "k": k, "parity_with_cpu": parity,
                         "compiled_matches_eager": all(torch.equal(a, b) for a, b in zip(on_device, compiled_out)),
                         "unfused_ms": round(unfused, 4), "fused_ms": round(fused, 4),
                         "speedup": round(unfused / fused, 2),
                         "v2_relaxed_parity_with_cpu": v2_parity,
                         "v2_relaxed_ms": round(time_ms(v2_relaxed_step, x, device, args.iters), 4),
                         "draw_float64_ms": round(time_ms(lambda y: draw(y, torch.float64), x, device, args.iters), 4),
                         "draw_float32_ms": round(time_ms(lambda y: draw(y, torch.float32), x, device, args.iters), 4),
                         "noise_host_matches_device": noise_parity,
                         "noise_host_ms": round(time_ms(lambda y: host_noise(y, device), host, device, args.iters), 4),
                         "noise_device_ms": round(time_ms(lambda y: uniform_noise(y["seed"], y["positions"]), x, device,
                                                          args.iters), 4)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "vocab": vocab, "rows": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
