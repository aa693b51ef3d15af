"""Tokens/s at real Gemma 4 widths with published acceptance rates: plain decoding, each fixed K, adaptive K
(issue 25 point 3).

    python benchmarks/real_width_speed.py --model e2b --ks 1,2,3 --batches 1,8,32 \
        --out benchmarks/results/real_width_speed

The pairs are ``tools/build_real_widths.py``'s (random weights at the published widths, only the layers the
attention pattern and the assistant's KV sources need: a few of the real model's 35 to 60 target layers, so the
target forward here is cheaper against drafting than in the real model). Random weights accept nothing, so the
drafts are judged by vLLM's ``rejection_sample_method: "synthetic"`` (the fused step honours it; not lossless, for
benchmarks only) at the per-position *unconditional* rates published for Gemma 4 26B-A4B with K=4, 0.844 / 0.599 /
0.385 / 0.271 (issue 25); at K=2 those give an acceptance length of 2.44, inside E2B's published 2.28-2.68.

A real-width engine takes 8+ GB, so engines run one at a time, in the order plain, fixed K ascending, adaptive
(not interleaved: each ratio divides passes of engines measured minutes apart; ``--rounds`` repeats the whole
order to show the drift). Each engine: bf16, compiled (``--eager``: eager), 1 GiB of KV, 48-token random prompts,
``max_tokens`` generated per request with ``ignore_eos``; a timed pass is one batch (batch 1: four requests in
turn). A step's time at S drafts is the pass's seconds over its steps (plain: tokens / b; fixed K: the drafting
steps vLLM counted / b), at full batch; adaptive K's column is seconds over its drafting steps only, so it is not
a step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vllm_mtp_gemma4.bench.job import EngineWorker
from vllm_mtp_gemma4.bench.report import machine_info

PAIRS = Path("~/.cache/vllm-mtp-gemma4/real-widths").expanduser()
# Unconditional per-position acceptance, Gemma 4 26B-A4B, K=4 (issue 25).
PUBLISHED_RATES = [0.844, 0.599, 0.385, 0.271]
PROMPT_LEN = 48
WARMUP_TOKENS = 16  # a served engine has measured its step times long before; so has each engine here
SMALLEST_PASS = 4  # requests a timed pass runs at least (batch 1: four in turn)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(1000, 250_000, (PROMPT_LEN,), generator=generator).tolist() for _ in range(count)]


def methods(ks: list[int]) -> list[tuple[str, int | None, dict | None]]:
    """(name, K, the plugin's section) in run order; plain has no speculative config."""
    return [("plain", None, None), *((f"fixed K={k}", k, {"adaptive_k": False}) for k in ks),
            (f"adaptive K={max(ks)}", max(ks), {"adaptive_k": True})]


def engine_args(pair: Path, k: int | None, section: dict | None, max_tokens: int, eager: bool) -> dict:
    engine = {"model": str(pair / "target"), "dtype": "bfloat16", "enforce_eager": eager,
              "max_model_len": PROMPT_LEN + max_tokens + 16, "max_num_seqs": 32, "max_num_batched_tokens": 2048}
    if k is not None:
        engine["speculative_config"] = {
            "method": "mtp", "model": str(pair / "assistant"), "num_speculative_tokens": k,
            "rejection_sample_method": "synthetic", "synthetic_acceptance_rates": PUBLISHED_RATES[:k],
            "vllm_mtp_gemma4": section}
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="e2b", help=f"a pair under {PAIRS}")
    parser.add_argument("--ks", default="1,2,3")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1)
    # Compiled, the fused runner's engine fails at start with synthetic acceptance on CPU: vLLM's sampler warm-up
    # (``_dummy_sampler_run``) calls its own rejection sampler, which asserts "Synthetic acceptance not supported
    # with CPU sampling".
    parser.add_argument("--eager", action="store_true", help="enforce_eager engines (needed with synthetic on CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/real_width_speed"))
    args = parser.parse_args()
    ks, batches = [int(k) for k in args.ks.split(",")], [int(b) for b in args.batches.split(",")]
    pair = PAIRS / args.model
    out = args.out / args.model
    (out / "logs").mkdir(parents=True, exist_ok=True)
    texts = prompts(max(*batches, SMALLEST_PASS))
    started, passes, engines = time.perf_counter(), [], []
    for round_ in range(args.rounds):
        for name, k, section in methods(ks):
            begin = time.perf_counter()
            log = out / "logs" / f"{name.replace(' ', '-').replace('=', '')}-r{round_}.log"
            with EngineWorker(engine_args(pair, k, section, args.max_tokens, args.eager), log, plugins=k is not None,
                              env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=1800) as worker:
                for batch in batches:  # untimed: compiles, first calls of each shape, adaptive K's first plans
                    worker.generate(texts[:batch], {"temperature": 0.0, "max_tokens": WARMUP_TOKENS,
                                                    "ignore_eos": True}, batch)
                engines.append({"method": name, "round": round_, "start_seconds": round(time.perf_counter() - begin)})
                for batch in batches:
                    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True,
                                "detokenize": False}
                    result = worker.generate(texts[:max(batch, SMALLEST_PASS)], sampling, batch)
                    steps = (result.spec.num_drafts if k else result.generated_tokens) / batch
                    passes.append({"method": name, "k": k, "round": round_, "batch": batch,
                                   "seconds": result.seconds, "tokens": result.generated_tokens,
                                   "tokens_per_s": result.generated_tokens / result.seconds,
                                   "step_ms": 1e3 * result.seconds / steps if steps else None,
                                   "acceptance_length": result.spec.mean_acceptance_length
                                   if result.spec.num_drafts else None,
                                   "peak_rss_gib": result.peak_rss_bytes / 2**30})
                    print(json.dumps(passes[-1]), flush=True)
            write(out, args, started, engines, passes, batches)  # after each engine: a stopped run keeps its part
    print(write(out, args, started, engines, passes, batches))


def write(out: Path, args: argparse.Namespace, started: float, engines: list, passes: list, batches: list[int]) -> str:
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
             for k, v in vars(args).items() if v is not False]  # a store_true flag as typed
    results = {"command": "python benchmarks/real_width_speed.py " + " ".join(flags), "machine": machine_info(),
        "rates": PUBLISHED_RATES, "wall_seconds": round(time.perf_counter() - started), "engines": engines,
        "passes": passes}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = summary(results, batches)
    (out / "summary.md").write_text(text)
    return text


def summary(results: dict, batches: list[int]) -> str:
    by = {}
    for p in results["passes"]:
        by.setdefault((p["method"], p["batch"]), []).append(p)
    names = list(dict.fromkeys(p["method"] for p in results["passes"]))
    med = {key: statistics.median(p["tokens_per_s"] for p in ps) for key, ps in by.items()}
    lines = [f"`{results['command']}`", "",
             f"{results['machine']['cpu']}, {results['machine']['usable_cores']} cores; synthetic acceptance "
             f"{results['rates']}; {results['wall_seconds']} s.", "",
             "| method | " + " | ".join(f"b={b} tok/s (÷ plain)" for b in batches) + " | "
             + " | ".join(f"b={b} step ms" for b in batches) + " | acceptance length |",
             "|---|" + "---|" * (2 * len(batches) + 1)]
    for name in names:
        cells = [f"{med[(name, b)]:.1f} ({med[(name, b)] / med[('plain', b)]:.2f})" if (name, b) in med else "-"
                 for b in batches]
        steps = [statistics.median(p["step_ms"] for p in by[(name, b)]) if (name, b) in by else None
                 for b in batches]
        lengths = [p["acceptance_length"] for b in batches for p in by.get((name, b), []) if p["acceptance_length"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + " | ".join("-" if s is None else f"{s:.1f}" for s in steps) + " | "
                     + (f"{statistics.mean(lengths):.2f}" if lengths else "-") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
