"""Run one offline vLLM generation job in a fresh subprocess and return its outputs and metrics.

Each job gets its own process, so jobs with the plugin on and off (upstream vLLM, selected by
``VLLM_PLUGINS`` naming a plugin that does not exist) never share vLLM's process-wide state.
Tests and the benchmark both use it.

    echo '{"engine": {...}, "prompts": [...], "sampling": {...}}' | python -m vllm_mtp_gemma4.bench.job out.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLUGINS_OFF = "vllm-mtp-gemma4-disabled"  # names no installed plugin, so none loads
DEFAULT_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Job:
    """What to run: ``LLM(**engine)`` then ``generate(prompts, SamplingParams(**sampling))``."""

    engine: dict[str, Any]
    prompts: list[str] | list[list[int]]
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 64})
    plugins: bool = True
    env: dict[str, str] = field(default_factory=dict)
    repeats: int = 1


@dataclass
class SpecMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per speculative step: 1 + accepted drafts per step."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []


@dataclass
class JobResult:
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    spec: SpecMetrics
    seconds: list[float]  # wall time of each repeat of generate()
    generated_tokens: int
    metrics: dict[str, float]  # every counter and gauge vLLM reported, by name
    log: str = ""  # the subprocess's whole stdout and stderr


def _engine_defaults(engine: dict[str, Any]) -> dict[str, Any]:
    return {"gpu_memory_utilization": 0.2, "disable_log_stats": False, "seed": 0, **engine}


def run_in_process(job: Job) -> JobResult:
    """Run ``job`` here (the subprocess side)."""
    from vllm import LLM, SamplingParams
    from vllm.v1.metrics.reader import Counter, Gauge, Vector

    llm = LLM(**_engine_defaults(job.engine))
    params = SamplingParams(**job.sampling)
    prompts: list = (
        [{"prompt_token_ids": p} for p in job.prompts] if job.prompts and isinstance(job.prompts[0], list)
        else list(job.prompts)
    )
    seconds, outputs = [], []
    for _ in range(job.repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    spec, flat = SpecMetrics(), {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            flat[m.name] = flat.get(m.name, 0) + m.value
        if m.name == "vllm:spec_decode_num_drafts":
            spec.num_drafts += m.value
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            spec.num_draft_tokens += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            spec.num_accepted_tokens += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos" and isinstance(m, Vector):
            spec.accepted_per_pos = [a + b for a, b in zip(spec.accepted_per_pos or [0] * len(m.values), m.values)]
    return JobResult(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        texts=[o.outputs[0].text for o in outputs],
        finish_reasons=[str(o.outputs[0].finish_reason) for o in outputs],
        spec=spec,
        seconds=seconds,
        generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        metrics=flat,
    )


def run_job(job: Job, timeout: float = 900) -> JobResult:
    """Run ``job`` in a fresh Python process; raise ``RuntimeError`` with the log tail on failure."""
    env = {**os.environ, **DEFAULT_ENV, **job.env}
    if not job.plugins:
        env["VLLM_PLUGINS"] = PLUGINS_OFF
    with tempfile.TemporaryDirectory(prefix="mtp-job-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        with log.open("w") as log_file:
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_mtp_gemma4.bench.job", str(out)],
                input=json.dumps(asdict(job)), text=True, env=env, cwd=tmp,
                stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout,
            )
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"engine job failed (exit {proc.returncode}):\n{text[-6000:]}")
        data = json.loads(out.read_text())
    data["spec"] = SpecMetrics(**data["spec"])
    data["log"] = text
    return JobResult(**data)


def main() -> None:
    job = Job(**json.loads(sys.stdin.read()))
    result = run_in_process(job)
    Path(sys.argv[1]).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
