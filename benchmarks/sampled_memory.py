"""Peak memory one V1 verification adds at Gemma 4's vocabulary: ``FusedStepMixin._sample`` (vLLM's per-position
processors, then ``ops.verify_step`` / ``verify_greedy``) on synthetic logits, without an engine.

    python benchmarks/sampled_memory.py                       # this tree
    python benchmarks/sampled_memory.py --baseline 7f4e2a1    # and a git revision, same run

Each (tree, configuration) runs in a fresh process on one thread: it builds the batch's inputs and its logits
[B (K+1), V] float32 (in place, so no temporary raises the high-water mark), verifies a B = 2 batch once to load
every code path, then reads the peak resident set before and after one verification at B, K, V. The difference
is what verification adds over the logits vLLM hands it. Results go to benchmarks/results/scale/sampled_memory.json
and sampled_memory.md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

CONFIGS = {  # name: (SamplingParams keywords, relaxed acceptance on)
    "greedy": ({"temperature": 0.0}, False),
    "T=0.8": ({"temperature": 0.8}, False),
    "T=0.8, top_p=0.95": ({"temperature": 0.8, "top_p": 0.95}, False),
    "T=0.8, top_k=50, min_p=0.05": ({"temperature": 0.8, "top_k": 50, "min_p": 0.05}, False),
    "T=0.8, relaxed, in thinking": ({"temperature": 0.8}, True),
}
OPEN_ID, CLOSE_ID = 5, 6


def step(batch: int, k: int, vocab: int, params: dict, relaxed: bool):
    """A runner stand-in whose ``_sample`` verifies one step of ``batch`` rows with k drafts each, and its logits."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    from vllm_mtp_gemma4.config import PluginConfig
    from vllm_mtp_gemma4.worker.v1.requests import RequestTracker
    from vllm_mtp_gemma4.worker.v1.verifier import StepVerifier

    device = torch.device("cpu")
    tracker = RequestTracker(PluginConfig(relaxed_acceptance=relaxed), OPEN_ID, CLOSE_ID, k, device)
    req_ids = [f"req-{i}" for i in range(batch)]
    prompt = list(range(10, 210)) + [OPEN_ID]  # inside a thinking block
    sampling_params = [SamplingParams(max_tokens=4096, **params) for _ in req_ids]
    for req_id, p in zip(req_ids, sampling_params):
        p.update_from_generation_config({"eos_token_id": [1, 106]}, 1)
        tracker.admit(req_id, p, prompt)
    greedy = params["temperature"] == 0.0

    def column(name: str, off):
        value = params.get(name, off)
        return None if value == off else torch.full((batch,), value)

    metadata = SamplingMetadata(
        temperature=None if greedy else torch.full((batch,), params["temperature"]), all_greedy=greedy,
        all_random=not greedy, top_p=column("top_p", 1.0), top_k=column("top_k", 0), generators={},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(batch),
        presence_penalties=torch.zeros(batch), repetition_penalties=torch.ones(batch),
        output_token_ids=[[] for _ in req_ids], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors())
    drafts = [list(range(11, 11 + k)) for _ in req_ids]
    batch_state = SimpleNamespace(num_reqs=batch, req_ids=req_ids, sampling_metadata=metadata, spec_token_ids=drafts,
                                  num_tokens_no_spec=np.full(batch, len(prompt), np.int64))
    runner = SimpleNamespace(fused=True, input_batch=batch_state, tracker=tracker,
                             verifier=StepVerifier(Sampler(), tracker), device=device,
                             discard_request_mask=SimpleNamespace(np=np.zeros(batch, bool)), _rows=None)
    logits = torch.empty(batch * (k + 1), vocab).normal_().mul_(3)
    return runner, logits, SpecDecodeMetadata.make_dummy(drafts, device)


def child(batch: int, k: int, vocab: int, name: str) -> None:
    """In a fresh process: the peak resident memory one verification adds."""
    import torch

    from vllm_mtp_gemma4.worker.v1.runner import FusedStepMixin

    torch.set_num_threads(1)
    params, relaxed = CONFIGS[name]
    FusedStepMixin._sample(*step(2, k, vocab, params, relaxed))  # loads every code path
    runner, logits, spec = step(batch, k, vocab, params, relaxed)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = FusedStepMixin._sample(runner, logits, spec)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    accepted = int((out.sampled_token_ids[:, :-1] >= 0).sum())  # uses the result: nothing skipped
    print(json.dumps({"extra_bytes": after - max(before, current), "rss_before": current, "peak_before": before,
                      "logits_bytes": logits.numel() * 4, "tokens_out": accepted}))


def measure(root: Path, batch: int, k: int, vocab: int, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(batch), str(k), str(vocab), name], env=env,
                          cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} in {root}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help="git revision to compare with")
    parser.add_argument("--keep-baseline", action="store_true",
                        help="reuse the baseline's rows from the previous results (same revision and shape)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), int(args.child[2]), args.child[3])
        return
    repo = Path(__file__).resolve().parent.parent
    from vllm_mtp_gemma4.ops.sampling import draw_bound_bytes

    trees = {"this tree": repo}
    results: dict[str, dict[str, dict]] = {}
    kept = {}
    if args.keep_baseline:
        previous = json.loads((args.out / "sampled_memory.json").read_text())
        assert [previous[x] for x in ("batch", "k", "vocab")] == [args.batch, args.k, args.vocab]
        kept = {f"baseline {args.baseline}": previous["results"][f"baseline {args.baseline}"]}
        kept_date = previous.get("baseline_date", previous["date"])
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline and not kept:
            archive = subprocess.run(["git", "archive", args.baseline, "vllm_mtp_gemma4"], cwd=repo,
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees[f"baseline {args.baseline}"] = Path(tmp)
        for tree, root in trees.items():
            for name in CONFIGS:
                results.setdefault(tree, {})[name] = measure(root, args.batch, args.k, args.vocab, name)
                print(tree, name, json.dumps(results[tree][name]), flush=True)
    results.update(kept)
    trees.update({tree: None for tree in kept})
    bound = draw_bound_bytes(args.vocab)
    command = ("python benchmarks/sampled_memory.py" + (f" --baseline {args.baseline}" if args.baseline else "")
               + (" --keep-baseline" if kept else ""))
    logits_gib = args.batch * (args.k + 1) * args.vocab * 4 / 2**30
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampled_memory.json").write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command, "batch": args.batch,
        "k": args.k, "vocab": args.vocab, "bound_bytes": bound, "results": results,
        **({"baseline_date": kept_date} if kept else {})}, indent=1) + "\n")
    lines = ["# Memory one V1 verification adds (`FusedStepMixin._sample`)", "",
             f"`{command}`: B = {args.batch}, K = {args.k}, V = {args.vocab:,}, logits [B (K+1), V] float32 "
             f"({logits_gib:.2f} GiB, vLLM's); peak resident memory added by one verification, fresh process, one "
             f"thread. Bound on the chunked path's own temporaries (``ops.sampling.draw_bound_bytes``): "
             f"{bound / 2**20:.0f} MiB."
             + (f" The baseline's rows are from the run of {kept_date} (``--keep-baseline``)." if kept else ""), "",
             "| configuration | " + " | ".join(f"{t} (MiB)" for t in trees) + " |",
             "|---" * (len(trees) + 1) + "|"]
    for name in CONFIGS:
        lines.append(f"| {name} | " + " | ".join(f"{results[t][name]['extra_bytes'] / 2**20:,.0f}" for t in trees)
                     + " |")
    (args.out / "sampled_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
