"""The fused step's verification on the host, per step: ``FusedStepMixin._sample`` (the batch's row inputs, vLLM's
per-position processors, ``logit_bias``, the verdict) on synthetic logits, without an engine.

    python benchmarks/verify_step.py                          # this tree: ms per step by configuration
    python benchmarks/verify_step.py --baseline 6a1f614       # and a git revision, interleaved in one run

With ``--baseline`` the revision's package is unpacked (``git archive``) into a temporary folder and each tree
gets a worker process; for every configuration the two workers then take turns, one measurement each per round,
so both see the same machine load; the summary is each configuration's median over rounds and the ratio of the
medians (this tree / baseline). Results go to
benchmarks/results/verify_step/ (``--out``). A steady decode run: every row has K drafts and gains 2 tokens a
step; the batch keeps its requests, as between arrivals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIAS = {"logit_bias": {7: 1.0, 9: -2.0}, "min_p": 0.05}
CONFIGS = [  # (batch, vocab, temperature, per-request extras, only the batch's row inputs timed)
    (1, 4096, 0.8, BIAS, True), (32, 4096, 0.8, BIAS, True),
    (1, 4096, 0.0, {}, False), (32, 4096, 0.0, {}, False), (1, 4096, 0.8, {}, False), (32, 4096, 0.8, {}, False),
    (32, 4096, 0.8, BIAS, False), (1, 262144, 0.0, {}, False),
]
K = 3
STEPS, WARMUP = 30, 5


def measure(batch: int, vocab: int, temperature: float, extras: dict, rows_only: bool) -> float:
    """Median seconds per ``_sample`` call, or per call of the tracker that builds the batch's row inputs."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    from vllm_mtp_gemma4.config import PluginConfig
    from vllm_mtp_gemma4.worker.v1 import requests as tracking
    from vllm_mtp_gemma4.worker.v1.runner import FusedStepMixin
    from vllm_mtp_gemma4.worker.v1.verifier import StepVerifier

    torch.manual_seed(0)
    device = torch.device("cpu")
    config = PluginConfig()
    open_id, close_id, prompt_len = 5, 6, 200
    req_ids = [f"req-{i}" for i in range(batch)]
    params = [SamplingParams(temperature=temperature, max_tokens=4096, **extras) for _ in range(batch)]
    for p in params:
        p.update_from_generation_config({"eos_token_id": [1, 106]}, 1)
    prompts = [list(range(10, 10 + prompt_len)) for _ in range(batch)]
    if hasattr(tracking.RequestTracker, "admit"):
        tracker = tracking.RequestTracker(config, open_id, close_id, K, device)
        verifier = StepVerifier(Sampler(), tracker)
        for req_id, p, prompt in zip(req_ids, params, prompts):
            tracker.admit(req_id, p, prompt)
    else:  # the per-step row inputs of earlier revisions
        tracker = tracking.RequestTracker(config, open_id, close_id, K)
        verifier = StepVerifier(Sampler(), open_id, close_id, [1, 106, close_id])
    max_len = prompt_len + 2 * (STEPS + WARMUP) + K + 1
    token_ids = np.zeros((batch, max_len), np.int32)
    token_ids[:, :prompt_len] = prompts
    num_tokens = np.full(batch, prompt_len, np.int64)
    greedy = temperature == 0.0
    metadata = SamplingMetadata(
        temperature=None if greedy else torch.full((batch,), temperature), all_greedy=greedy, all_random=not greedy,
        top_p=None, top_k=None, generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch), output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())
    drafts = [[11, 12, 13] for _ in range(batch)]
    batch_state = SimpleNamespace(num_reqs=batch, req_ids=req_ids, token_ids_cpu=token_ids,
                                  num_tokens_no_spec=num_tokens, sampling_metadata=metadata, spec_token_ids=drafts)
    runner = SimpleNamespace(fused=True, input_batch=batch_state, tracker=tracker, verifier=verifier, device=device,
                             requests={r: SimpleNamespace(sampling_params=p) for r, p in zip(req_ids, params)},
                             discard_request_mask=SimpleNamespace(np=np.zeros(batch, bool)), _rows=None)
    logits = torch.randn(batch * (K + 1), vocab)
    times = []
    for _ in range(STEPS + WARMUP):
        spec = SpecDecodeMetadata.make_dummy(drafts, device)
        step_logits = logits.clone()
        begin = time.perf_counter()
        if not rows_only:
            FusedStepMixin._sample(runner, step_logits, spec)
        elif hasattr(tracker, "rows"):
            tracker.rows(req_ids)
        else:
            tracker.row_inputs(req_ids, params, token_ids, num_tokens, [greedy] * batch, device)
        times.append(time.perf_counter() - begin)
        token_ids[:, num_tokens[0]:num_tokens[0] + 2] = [7, 8]  # two committed tokens a step
        num_tokens += 2
    return statistics.median(times[WARMUP:])


def worker() -> None:
    """Measure the configuration whose index arrives on stdin, one line per request, answering each on stdout."""
    import torch

    torch.set_num_threads(1)  # one core: the machine is shared, and the step's host work is single-threaded
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"seconds {measure(*CONFIGS[int(line)])!r}", flush=True)


def start_worker(package_root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(package_root), "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=package_root)
    while proc.stdout.readline().strip() != "ready":
        pass
    return proc


def ask(proc: subprocess.Popen, index: int) -> float:
    proc.stdin.write(f"{index}\n")
    proc.stdin.flush()
    while not (line := proc.stdout.readline()).startswith("seconds "):  # vLLM logs to stdout too
        if not line:
            raise RuntimeError("benchmark worker died")
    return float(line.split()[1])


def label(config: tuple) -> str:
    batch, vocab, temperature, extras, rows_only = config
    kind = "greedy" if temperature == 0.0 else f"T={temperature}" + (" +bias,min_p" if extras else "")
    return ("row inputs only, " if rows_only else "") + f"B={batch} V={vocab} {kind}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help="git revision to compare with, interleaved")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/verify_step"))
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    repo = Path(__file__).resolve().parent.parent
    trees = {"this tree": repo}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            archive = subprocess.run(["git", "archive", args.baseline, "vllm_mtp_gemma4"], cwd=repo,
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees[f"baseline {args.baseline}"] = Path(tmp)
        workers = {name: start_worker(root) for name, root in trees.items()}
        runs = {name: [[] for _ in CONFIGS] for name in trees}  # [config][round] seconds
        for index in range(len(CONFIGS)):
            for _ in range(args.rounds):
                for name, proc in workers.items():
                    runs[name][index].append(ask(proc, index))
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    medians = {name: [statistics.median(per_round) for per_round in configs] for name, configs in runs.items()}
    ratio = " | ratio |" if args.baseline else " |"
    lines = ["| configuration | " + " | ".join(f"{n} (ms)" for n in medians) + ratio,
             "|---" * (len(medians) + 1 + bool(args.baseline)) + "|"]
    for i, config in enumerate(CONFIGS):
        cells = [f"{m[i] * 1e3:.3f}" for m in medians.values()]
        if args.baseline:
            values = list(medians.values())
            cells.append(f"{values[0][i] / values[1][i]:.2f}")
        lines.append(f"| {label(config)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"configs": [label(c) for c in CONFIGS], "runs": runs,
                                                       "medians_s": medians, "rounds": args.rounds}, indent=1))
    command = "python benchmarks/verify_step.py" + (f" --baseline {args.baseline}" if args.baseline else "")
    (args.out / "summary.md").write_text(
        f"# Verification per step on the host (`FusedStepMixin._sample`)\n\n`{command}` (K={K}, median of "
        f"{STEPS} steps per measurement, median of {args.rounds} rounds in which the trees take turns, one thread "
        f"each)\n\n{table}\n")


if __name__ == "__main__":
    main()
