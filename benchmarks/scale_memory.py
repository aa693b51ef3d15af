"""Memory at Gemma 4's vocabulary: peak resident memory and KV blocks, the plugin against upstream vLLM.

    python benchmarks/scale_memory.py [--k 3 4]   # about 10 minutes an engine on 2 CPU cores

The E2B target at its published widths (``tools/build_real_widths.py``: V = 262,144, hidden 1,536) with its
assistant at its published widths but a dense head (``assistant-dense``: upstream vLLM 0.32 cannot start the
centroid head on CPU, it captures CUDA graphs for it), bf16 (as users run it; fp32 doubles the weights on a shared
machine), eager, at most 32 sequences. For each K, one engine with the plugin and one with upstream's Gemma 4 MTP
(plugins off), one at a time. Results (``memory.json``, ``memory.md`` in benchmarks/results/scale/) are rewritten
after every engine, so a stopped run keeps what it measured.
Each engine runs, in this order, passes at b = 1 and b = 32 (32 prompts of 48 token ids,
16 new tokens each, in generate calls of b), greedy then sampled (T = 0.8, unseeded); after each pass the high-water
resident memory of the engine's processes (``VmHWM``, summed) is read. The peak can only grow, so each pass's
growth over the previous one is what that pass needed beyond everything before it. KV blocks are what the engine
allocated (``VLLM_CPU_KVCACHE_SPACE=1`` for both: the plugin keeps no KV of its own).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
OUT = REPO / "benchmarks" / "results" / "scale"
PASSES = [(1, 0.0), (1, 0.8), (32, 0.0), (32, 0.8)]  # (b, temperature)
PROMPTS, PROMPT_LEN, TOKENS = 32, 48, 16


def main() -> None:
    from build_real_widths import build, build_dense_assistant

    from vllm_mtp_gemma4.bench.job import EngineWorker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--engines", nargs="+", choices=["plugin", "upstream"], default=["plugin", "upstream"])
    parser.add_argument("--append", action="store_true",
                        help="keep the other engines' rows of the last results (a run stopped by the machine)")
    args = parser.parse_args()
    root = Path("~/.cache/vllm-mtp-gemma4/real-widths").expanduser()
    pair = build("e2b", root)
    assistant = build_dense_assistant("e2b", root)
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(1000, 250_000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(PROMPTS)]
    OUT.mkdir(parents=True, exist_ok=True)
    names = {f"{e}-k{k}" for e in args.engines for k in args.k}
    rows = [r for r in json.loads((OUT / "memory.json").read_text())["rows"] if r["engine"] not in names] \
        if args.append else []
    command = "python benchmarks/scale_memory.py" + (f" --k {' '.join(map(str, args.k))}" if args.k != [3, 4] else "")
    if args.append:
        command += f" --engines {' '.join(args.engines)} --append (added to the rows of the run before)"
    for k in args.k:
        for plugins in [e == "plugin" for e in args.engines]:
            spec = {"method": "mtp", "model": str(assistant), "num_speculative_tokens": k}
            if plugins:
                spec["vllm_mtp_gemma4"] = {}
            engine = {"model": str(pair / "target"), "dtype": "bfloat16", "enforce_eager": True,
                      "max_model_len": 512, "max_num_seqs": 32, "max_num_batched_tokens": 1024,
                      "speculative_config": spec}
            name = f"{'plugin' if plugins else 'upstream'}-k{k}"
            with EngineWorker(engine, OUT / f"{name}.log", plugins=plugins, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                              timeout=1800) as worker:
                previous = 0
                for batch, temperature in PASSES:
                    # Unseeded: upstream vLLM 0.32 on CPU dies on a seeded request whose sample a chunked prefill
                    # discards ("CPU Generator does not use offset"), as at b = 32 here.
                    sampling = {"temperature": temperature, "max_tokens": TOKENS, "detokenize": False,
                                "ignore_eos": True}
                    result = worker.generate(prompts[:max(batch, 4)] if batch == 1 else prompts, sampling, batch)
                    rows.append({"engine": name, "k": k, "plugin": plugins, "b": batch, "temperature": temperature,
                                 "kv_blocks": worker.info["kv_blocks"], "peak_rss_gib": result.peak_rss_bytes / 2**30,
                                 "growth_gib": (result.peak_rss_bytes - previous) / 2**30 if previous else None,
                                 "tokens": result.generated_tokens})
                    previous = result.peak_rss_bytes
                    print(json.dumps(rows[-1]), flush=True)
            write(rows, command)


def write(rows: list[dict], command: str) -> None:
    model = ("E2B published widths (tools/build_real_widths.py), dense-head assistant, bf16, eager, V = 262,144, "
             "max_num_seqs 32, VLLM_CPU_KVCACHE_SPACE=1")
    (OUT / "memory.json").write_text(json.dumps({
        "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": model, "rows": rows}, indent=1) + "\n")
    lines = ["# Memory at V = 262,144: the plugin against upstream vLLM", "", f"`{command}`: {model}. Peak resident "
             "memory is the engine's processes' high-water marks summed, read after each pass in this order; growth "
             "is over the previous pass of the same engine.", "",
             "| engine | pass | KV blocks | peak RSS (GiB) | growth (GiB) |", "|---|---|---|---|---|"]
    for r in rows:
        kind = "greedy" if r["temperature"] == 0.0 else f"T={r['temperature']}"
        growth = "(start)" if r["growth_gib"] is None else f"{r['growth_gib']:.2f}"
        lines.append(f"| {r['engine']} | b={r['b']}, {kind} | {r['kv_blocks']:,} | {r['peak_rss_gib']:.2f} | "
                     f"{growth} |")
    (OUT / "memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
