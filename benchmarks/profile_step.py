"""Where a decode step's time goes, end to end, for plain decoding, vLLM's own MTP and the plugin, at batch 1 and
32; and how long each engine takes to start, with a cold and a warm compile cache.

    python benchmarks/profile_step.py            # writes benchmarks/results/profile/{results.json,summary.md,steps.png}

Each engine runs in a subprocess of its own (the plugin on or off needs a fresh process) with the engine core and
the worker inside it (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``), so one cProfile sees the scheduler,
the engine core, the model runner and output processing. Engines are compiled (as served), greedy, K=3, on the
bundled fixture. Each engine starts twice on one fresh compile cache: the first start compiles (cold), the second
loads what the first compiled (warm). cProfile slows Python more than torch kernels, so its milliseconds are
inflated where the step is Python; the split between components, measured in the same run, is what to read.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

FIXTURE = Path("fixtures/gemma4-tiny")
OUT = Path("benchmarks/results/profile")
BATCHES = (1, 32)
MAX_TOKENS = 64
METHODS = {
    "plain": {"plugins": True, "spec": None},
    "upstream": {"plugins": False, "spec": {}},
    "plugin": {"plugins": True, "spec": {"vllm_mtp_gemma4": {}}},
    "plugin-adaptive": {"plugins": True, "spec": {"vllm_mtp_gemma4": {"adaptive_k": True}}},
}
# (label, [(file suffix, function name)]): a row's time is the largest matching entry's cumulative time (the
# outermost of nested overrides, never their sum).
ROWS = [
    ("engine step (all)", [("v1/engine/llm_engine.py", "step")]),
    ("scheduler: schedule", [("core/sched/scheduler.py", "schedule")]),
    ("scheduler: update_from_output", [("core/sched/scheduler.py", "update_from_output")]),
    ("runner: execute_model (inputs + target)", [("worker/gpu_model_runner.py", "execute_model"),
                                                  ("worker/v1/runner.py", "execute_model")]),
    ("  inputs: _prepare_inputs", [("worker/gpu_model_runner.py", "_prepare_inputs")]),
    ("  target forward", [("worker/gpu_model_runner.py", "_model_forward")]),
    ("runner: sample_tokens (verify + draft + read)", [("worker/gpu_model_runner.py", "sample_tokens"),
                                                        ("worker/v1/runner.py", "sample_tokens")]),
    ("  verify / sample", [("worker/gpu_model_runner.py", "_sample"), ("worker/v1/runner.py", "_sample")]),
    ("    plugin: row inputs (host)", [("worker/v1/requests.py", "row_inputs")]),
    ("  draft: propose", [("spec_decode/llm_base_proposer.py", "propose"), ("worker/v1/proposer.py", "propose")]),
    ("  plugin: plan (cost model)", [("worker/v1/runner.py", "_plan")]),
    ("  plugin: host read", [("worker/v1/runner.py", "_read_step")]),
    ("  bookkeeping", [("worker/gpu_model_runner.py", "_bookkeeping_sync")]),
    ("output processing", [("v1/engine/output_processor.py", "process_outputs")]),
]


def _child(method: str, profile: bool) -> dict:
    from vllm import LLM, SamplingParams

    spec_extra = METHODS[method]["spec"]
    engine = {"model": str(FIXTURE / "target"), "dtype": "float32", "max_model_len": 2048, "seed": 0,
              "gpu_memory_utilization": 0.2, "distributed_executor_backend": "uni", "max_num_seqs": max(BATCHES)}
    if spec_extra is not None:
        engine["speculative_config"] = {"method": "mtp", "model": str(FIXTURE / "assistant"),
                                        "num_speculative_tokens": 3, **spec_extra}
    begin = time.perf_counter()
    llm = LLM(**engine)
    result: dict = {"start_seconds": time.perf_counter() - begin}
    if not profile:
        return result
    prompts = json.loads((FIXTURE / "held_out_prompts.json").read_text())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up (and, for adaptive K, its cost fit)
    for batch in BATCHES:
        llm.generate(prompts[:batch], params, use_tqdm=False)
        profiler = cProfile.Profile()
        begin = time.perf_counter()
        profiler.enable()
        outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
        profiler.disable()
        wall = time.perf_counter() - begin
        stats = pstats.Stats(profiler).stats
        steps = max((s[0] for (f, _, n), s in stats.items() if f.endswith("v1/engine/llm_engine.py")
                     and n == "step"), default=0)
        rows = {}
        for label, keys in ROWS:
            found = [s[3] for (f, _, n), s in stats.items() if any(f.endswith(suf) and n == fn for suf, fn in keys)]
            rows[label] = round(1000 * max(found) / steps, 3) if found and steps else None
        result[f"b{batch}"] = {"steps": steps, "wall_seconds": round(wall, 3),
                               "tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "ms_per_step": rows}
    return result


def _run_child(method: str, profile: bool, cache: Path) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CACHE_ROOT": str(cache),
           "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    if not METHODS[method]["plugins"]:
        env["VLLM_PLUGINS"] = "vllm-mtp-gemma4-disabled"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--out", out.name]
                              + (["--profile"] if profile else []), env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{method}: child failed\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def _summary(results: dict) -> str:
    methods = list(results["methods"])
    lines = [f"# Step profile and engine start\n\n`{results['command']}`\n",
             f"{results['date']}, {results['machine']}; greedy, K=3, {MAX_TOKENS} tokens per request, compiled, "
             "engine core and worker in one process under cProfile (its overhead inflates Python-heavy rows).\n",
             "## Engine start (s)\n", "| method | cold cache | warm cache | cold / upstream | warm / upstream |",
             "|---|---|---|---|---|"]
    up = results["methods"]["upstream"]
    for m in methods:
        r = results["methods"][m]
        lines.append(f"| {m} | {r['cold_start']:.1f} | {r['warm_start']:.1f} | "
                     f"{r['cold_start'] / up['cold_start']:.2f} | {r['warm_start'] / up['warm_start']:.2f} |")
    for batch in BATCHES:
        key = f"b{batch}"
        lines += [f"\n## Batch {batch}: ms per engine step (cumulative, per step)\n",
                  "| component | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for label, _ in ROWS:
            cells = [results["methods"][m][key]["ms_per_step"].get(label) for m in methods]
            lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
        lines.append("| steps | " + " | ".join(str(results["methods"][m][key]["steps"]) for m in methods) + " |")
        lines.append("| tokens per step | " + " | ".join(
            f"{results['methods'][m][key]['tokens'] / results['methods'][m][key]['steps']:.2f}" for m in methods)
            + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["scheduler: schedule", "scheduler: update_from_output", "runner: execute_model (inputs + target)",
             "  verify / sample", "  draft: propose", "  bookkeeping", "output processing"]
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(6 * len(BATCHES), 4))
    for ax, batch in zip(axes, BATCHES):
        methods = list(results["methods"])
        bottom = [0.0] * len(methods)
        for part in parts:
            values = [results["methods"][m][f"b{batch}"]["ms_per_step"].get(part) or 0.0 for m in methods]
            ax.bar(methods, values, bottom=bottom, label=part.strip())
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"batch {batch}: ms per engine step (cProfile)")
        ax.tick_params(axis="x", rotation=20)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(_child(args.child, args.profile)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python benchmarks/profile_step.py" + ("" if out == OUT else f" --out {out}"),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)", "methods": {}}
    for method in METHODS:
        with tempfile.TemporaryDirectory() as cache:
            cold = _run_child(method, False, Path(cache))
            warm = _run_child(method, True, Path(cache))
        results["methods"][method] = {"cold_start": cold["start_seconds"], "warm_start": warm["start_seconds"],
                                      **{k: v for k, v in warm.items() if k != "start_seconds"}}
        print(method, json.dumps(results["methods"][method])[:300], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(_summary(results))
    _plot(results, out / "steps.png")
    print(_summary(results))


if __name__ == "__main__":
    main()
