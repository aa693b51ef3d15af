"""How much the same engine's speed differs between processes: the noise floor under the benchmark's ratios.

    python benchmarks/process_spread.py --processes 3 --batch 1 --out benchmarks/results/process_spread

The benchmark (``vllm_mtp_gemma4.bench``) keeps one engine process per method for all its repeats, so its
min-max spread covers drift in time but not how one process differs from the next. Here plain decoding and the
plugin at fixed K=3 each start ``--processes`` times, alternating (plain, plugin, plain, ...), on the bundled fixture,
compiled, greedy, the benchmark's prompts, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one torch thread).
Each process warms up once at batch 32, then generates 8 prompts x 128 tokens at ``--batch`` and reports its
tokens/s and the median time of the target forward (``GPUModelRunner._model_forward``) per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIXTURE = Path("fixtures/gemma4-tiny")
PROMPTS = 8
MAX_TOKENS = 128


def child(method: str, batch: int) -> dict:
    """One engine process's measurement (runs in a fresh process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_mtp_gemma4.bench.sweep import build_prompts

    forward_seconds: list[float] = []
    model_forward = GPUModelRunner._model_forward

    def timed_forward(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            forward_seconds.append(time.perf_counter() - begin)

    GPUModelRunner._model_forward = timed_forward
    spec = {} if method == "plain" else {"speculative_config": {
        "method": "mtp", "model": str(FIXTURE / "assistant"), "num_speculative_tokens": 3}}
    llm = LLM(model=str(FIXTURE / "target"), dtype="float32", max_model_len=2048, seed=0, max_num_seqs=32, **spec)
    prompts = [{"prompt_token_ids": p} for p in build_prompts(FIXTURE, 32)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    forward_seconds.clear()
    begin = time.perf_counter()
    for first in range(0, PROMPTS, batch):
        llm.generate(prompts[first:first + batch], params, use_tqdm=False)
    seconds = time.perf_counter() - begin
    return {"method": method, "tokens_per_s": PROMPTS * MAX_TOKENS / seconds,
            "forward_ms_median": statistics.median(forward_seconds) * 1e3, "forwards": len(forward_seconds)}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label in zip(axes, ("tokens_per_s", "forward_ms_median"), ("tokens/s", "target forward, ms")):
        for x, method in enumerate(("plain", "plugin")):
            values = [r[key] for r in runs if r["method"] == method]
            ax.plot([x] * len(values), values, "o", alpha=0.7)
        ax.set_xticks([0, 1], ["plain", "plugin K=3"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylabel(label)
    fig.suptitle("one point per engine process (same configuration)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/process_spread"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.batch)), flush=True)
        return
    from tqdm import tqdm

    from vllm_mtp_gemma4.bench.report import machine_info

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    order = [m for _ in range(args.processes) for m in ("plain", "plugin")]
    for method in tqdm(order, desc="engine processes"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--batch", str(args.batch)], env=env,
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    args.out.mkdir(parents=True, exist_ok=True)
    command = (f"python benchmarks/process_spread.py --processes {args.processes} --batch {args.batch} "
               f"--out {args.out}")
    (args.out / "results.json").write_text(json.dumps(
        {"command": command, "machine": machine_info(), "batch": args.batch, "runs": runs}, indent=1) + "\n")
    lines = [f"`{command}`", "", "| method | tokens/s per process | target forward ms (median) per process | "
             "spread (max / min) |", "|---|---|---|---|"]
    for method in ("plain", "plugin"):
        mine = [r for r in runs if r["method"] == method]
        rates = [r["tokens_per_s"] for r in mine]
        forwards = [r["forward_ms_median"] for r in mine]
        lines.append(f"| {method} | {', '.join(f'{v:.0f}' for v in rates)} | "
                     f"{', '.join(f'{v:.2f}' for v in forwards)} | tokens/s {max(rates) / min(rates):.2f}, "
                     f"forward {max(forwards) / min(forwards):.2f} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(runs, args.out / "spread.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
