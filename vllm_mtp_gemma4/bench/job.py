"""Run one offline vLLM generation job in a fresh subprocess and return its outputs and metrics.

Each job gets its own process, so jobs with the plugin on and off (upstream vLLM, selected by
``VLLM_PLUGINS`` naming a plugin that does not exist) never share vLLM's process-wide state.
Tests use ``run_job``. The benchmark uses ``EngineWorker``: an engine kept alive in its own
process between timed passes, so passes of several live engines can be interleaved.

    echo '{"engine": {...}, "prompts": [...], "sampling": {...}}' | python -m vllm_mtp_gemma4.bench.job out.json
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vllm_mtp_gemma4.worker import STEP_PHASES

PLUGINS_OFF = "vllm-mtp-gemma4-disabled"  # names no installed plugin, so none loads
DEFAULT_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Job:
    """What to run: ``LLM(**engine)``, then ``generate`` over ``prompts``.

    ``sampling`` is one ``SamplingParams`` dict for all prompts, or one per prompt. ``batches``
    splits the prompts into consecutive ``generate`` calls of these sizes (default: one call).
    """

    engine: dict[str, Any]
    prompts: list[str] | list[list[int]] | list[dict[str, Any]]  # dicts: vLLM's prompt dicts, images as paths
    sampling: dict[str, Any] | list[dict[str, Any]] = field(
        default_factory=lambda: {"temperature": 0.0, "max_tokens": 64})
    plugins: bool = True
    env: dict[str, str] = field(default_factory=dict)
    batches: list[int] | None = None
    worker_counters: bool = False  # read the fused runner's counters (``LLM.collective_rpc``, pickled)
    progress: bool = False  # vLLM's own progress bar on each generate() call


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

    def __add__(self, other: SpecMetrics) -> SpecMetrics:
        return self._combine(other, 1)

    def __sub__(self, other: SpecMetrics) -> SpecMetrics:
        return self._combine(other, -1)

    def _combine(self, other: SpecMetrics, sign: int) -> SpecMetrics:
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        mine, theirs = (v + [0] * (width - len(v)) for v in (self.accepted_per_pos, other.accepted_per_pos))
        return SpecMetrics(
            self.num_drafts + sign * other.num_drafts,
            self.num_draft_tokens + sign * other.num_draft_tokens,
            self.num_accepted_tokens + sign * other.num_accepted_tokens,
            [a + sign * b for a, b in zip(mine, theirs)],
        )


@dataclass
class JobResult:
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stop_reasons: list[int | str | None]  # the stop string or token that ended each request, if any
    spec: SpecMetrics
    seconds: list[float]  # wall time of each generate() call
    generated_tokens: int
    metrics: dict[str, float]  # every counter and gauge reported, by name, and by "name{label=value}"
    kv_blocks: int  # KV cache blocks the engine allocated
    logprobs: list[list[dict[int, float]] | None] = field(default_factory=list)  # per request, per token
    prompt_logprobs: list[list[dict[int, float] | None] | None] = field(default_factory=list)
    worker_counters: list[dict[str, Any]] = field(default_factory=list)  # per worker; see ``Job.worker_counters``
    # per request, vLLM's own acceptance summary (engine option ``per_request_spec_decode_metrics``), else None
    request_spec: list[dict[str, Any] | None] = field(default_factory=list)
    log: str = ""  # the subprocess's whole stdout and stderr




@dataclass
class RunResult:
    """One timed pass of an ``EngineWorker``'s engine over a prompt list, in batches."""

    seconds: float  # wall time of the generate() calls only
    generated_tokens: int
    spec: SpecMetrics  # this pass's share of the engine's spec-decode counters
    peak_rss_bytes: int  # high-water resident memory of the engine's processes so far, summed
    # Seconds per fused step by phase (STEP_PHASES), from the plugin's runner. Upstream vLLM reports
    # no such split, so it stays empty (not measured) there.
    step_time_split: dict[str, float] = field(default_factory=dict)


def _engine_defaults(engine: dict[str, Any]) -> dict[str, Any]:
    return {"gpu_memory_utilization": 0.2, "disable_log_stats": False, "seed": 0, **engine}


def _job_env(plugins: bool, env: dict[str, str], worker_counters: bool = False) -> dict[str, str]:
    merged = {**os.environ, **DEFAULT_ENV, **env}
    if worker_counters:  # collective_rpc sends a function: vLLM pickles it only when allowed to
        merged["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if not plugins:
        merged["VLLM_PLUGINS"] = PLUGINS_OFF
    return merged


def _prompt_inputs(prompts: list[str] | list[list[int]] | list[dict[str, Any]]) -> list:
    """vLLM's prompt inputs. A dict prompt passes as it is, except that its ``multi_modal_data`` images, given as
    file paths (a job travels as JSON), are opened here."""
    if prompts and isinstance(prompts[0], list):
        return [{"prompt_token_ids": p} for p in prompts]
    return [_open_images(p) if isinstance(p, dict) else p for p in prompts]


def _open_images(prompt: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    data = prompt.get("multi_modal_data", {})
    return {**prompt, "multi_modal_data": {kind: [Image.open(path).convert("RGB") for path in items]
                                           if kind == "image" else items for kind, items in data.items()}}


def _sampling_params(sampling: dict[str, Any]) -> Any:
    """``SamplingParams`` from a job's dict, whose ``logit_bias`` token ids came through JSON as strings."""
    from vllm import SamplingParams

    if sampling.get("logit_bias"):
        sampling = {**sampling, "logit_bias": {int(k): v for k, v in sampling["logit_bias"].items()}}
    return SamplingParams(**sampling)


def run_in_process(job: Job) -> JobResult:
    """Run ``job`` here (the subprocess side)."""
    from vllm import LLM

    llm = LLM(**_engine_defaults(job.engine))
    prompts = _prompt_inputs(job.prompts)
    params = ([_sampling_params(s) for s in job.sampling] if isinstance(job.sampling, list)
              else [_sampling_params(job.sampling)] * len(prompts))
    seconds, outputs, start = [], [], 0
    for size in job.batches or [len(prompts)]:
        begin = time.perf_counter()
        outputs += llm.generate(prompts[start:start + size], params[start:start + size], use_tqdm=job.progress)
        seconds.append(time.perf_counter() - begin)
        start += size
    spec, flat = _read_metrics(llm)
    counters = []
    if job.worker_counters:
        from vllm_mtp_gemma4.worker.v1.runner import fused_step_counters

        counters = llm.collective_rpc(fused_step_counters)
    return JobResult(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        texts=[o.outputs[0].text for o in outputs],
        finish_reasons=[str(o.outputs[0].finish_reason) for o in outputs],
        stop_reasons=[o.outputs[0].stop_reason for o in outputs],
        kv_blocks=llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        spec=spec,
        seconds=seconds,
        generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        metrics=flat,
        logprobs=[_logprob_dicts(o.outputs[0].logprobs) for o in outputs],
        prompt_logprobs=[_logprob_dicts(o.prompt_logprobs) for o in outputs],
        worker_counters=counters,
        request_spec=[None if o.outputs[0].spec_decode_metrics is None else o.outputs[0].spec_decode_metrics.to_dict()
                      for o in outputs],
    )


def _logprob_dicts(logprobs: Any) -> list[dict[int, float] | None] | None:
    if logprobs is None:
        return None
    return [None if step is None else {int(t): float(lp.logprob) for t, lp in step.items()} for step in logprobs]


def _read_metrics(llm: Any) -> tuple[SpecMetrics, dict[str, float]]:
    """The engine's spec-decode counters so far, and every counter and gauge by name."""
    from vllm.v1.metrics.reader import Counter, Gauge, Vector

    spec, flat = SpecMetrics(), {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            flat[m.name] = flat.get(m.name, 0) + m.value
            for label, value in m.labels.items():  # also per label value, as "name{label=value}"
                key = f"{m.name}{{{label}={value}}}"
                flat[key] = flat.get(key, 0) + m.value
        if m.name == "vllm:spec_decode_num_drafts":
            spec.num_drafts += m.value
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            spec.num_draft_tokens += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            spec.num_accepted_tokens += m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos" and isinstance(m, Vector):
            spec.accepted_per_pos = [a + b for a, b in zip(spec.accepted_per_pos or [0] * len(m.values), m.values)]
    return spec, flat


class JobFailed(RuntimeError):
    """An engine job exited with an error; ``log`` is its whole stdout and stderr."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def first_error(log: str) -> str:
    """The first exception line in a log: the root cause, ahead of the wrappers that re-raise it."""
    match = re.search(r"\b\w+(?:Error|Exception): .+", log)
    return match.group(0).strip() if match else "no exception in the log"


def run_job(job: Job, timeout: float = 900, launcher: Sequence[str] = ()) -> JobResult:
    """Run ``job`` in a fresh Python process; raise ``JobFailed`` (its message ends with the log tail) on failure.

    ``launcher`` prefixes the command (e.g. ``ip netns exec NAME`` to run it in a network namespace).
    """
    env = _job_env(job.plugins, job.env, job.worker_counters)
    with tempfile.TemporaryDirectory(prefix="mtp-job-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        with log.open("w") as log_file:
            proc = subprocess.run(
                [*launcher, sys.executable, "-m", "vllm_mtp_gemma4.bench.job", str(out)],
                input=json.dumps(asdict(job)), text=True, env=env, cwd=tmp,
                stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout,
            )
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or not out.exists():
            raise JobFailed(f"engine job failed (exit {proc.returncode}): {first_error(text)}\n{text[-6000:]}", text)
        data = json.loads(out.read_text())
    data["spec"] = SpecMetrics(**data["spec"])
    for key in ("logprobs", "prompt_logprobs"):  # JSON turned the token-id keys into strings
        data[key] = [None if req is None else [None if step is None else {int(t): v for t, v in step.items()}
                                               for step in req] for req in data[key]]
    data["log"] = text
    return JobResult(**data)


class EngineWorker:
    """``LLM(**engine)`` kept alive in its own process, answering timed passes one at a time.

    Like ``run_job``, each engine gets a fresh process (plugin on or off). Keeping it alive lets the
    benchmark interleave passes of several engines, so machine noise spreads evenly over them.
    """

    def __init__(self, engine: dict[str, Any], log_path: Path, plugins: bool = True,
                 env: dict[str, str] | None = None, timeout: float = 900) -> None:
        self.log_path, self._timeout = log_path, timeout
        read_fd, write_fd = os.pipe()  # replies on their own pipe: vLLM logs to stdout
        with log_path.open("w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_mtp_gemma4.bench.job", "--worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                env=_job_env(plugins, env or {}, worker_counters=plugins), cwd=log_path.parent, pass_fds=(write_fd,),
                start_new_session=True,  # one process group, to kill the engine core with it
            )
        os.close(write_fd)  # so a dead worker reads as end of file
        self._replies = os.fdopen(read_fd)
        self._send({"engine": engine})
        self.info: dict[str, Any] = self._reply()  # kv_blocks, block_size

    def generate(self, prompts: list[str] | list[list[int]], sampling: dict[str, Any],
                 batch_size: int) -> RunResult:
        """Generate for ``prompts`` in consecutive ``generate`` calls of ``batch_size`` prompts."""
        self._send({"prompts": prompts, "sampling": sampling, "batch_size": batch_size})
        data = self._reply()
        return RunResult(**{**data, "spec": SpecMetrics(**data["spec"])})

    def close(self) -> None:
        try:
            self._proc.stdin.close()  # end of input: the worker shuts its engine down and exits
        except BrokenPipeError:  # it already exited
            pass
        try:
            self._proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._replies.close()

    def __enter__(self) -> EngineWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._fail("engine worker exited")

    def _reply(self) -> dict[str, Any]:
        ready, _, _ = select.select([self._replies], [], [], self._timeout)
        line = self._replies.readline() if ready else ""
        if not line:
            self._fail("engine worker exited" if ready else f"no reply within {self._timeout:.0f} s")
        return json.loads(line)

    def _fail(self, why: str) -> NoReturn:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self.close()
        text = self.log_path.read_text(errors="replace")
        raise RuntimeError(f"{why} (exit {self._proc.returncode}), log {self.log_path}:\n{text[-6000:]}")


def _peak_rss_bytes() -> int:
    """High-water resident memory of this process and its children (the engine core), summed.

    Each process's own peak (VmHWM), so pages shared between them count once per process.
    """
    import psutil

    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def _timed_pass(llm: Any, prompts: list[str] | list[list[int]], sampling: dict[str, Any],
                batch_size: int) -> RunResult:
    params, inputs = _sampling_params(sampling), _prompt_inputs(prompts)
    before, seconds, tokens = _read_metrics(llm)[0], 0.0, 0
    counters_before = _fused_counters(llm)
    for i in range(0, len(inputs), batch_size):
        start = time.perf_counter()
        outputs = llm.generate(inputs[i:i + batch_size], params, use_tqdm=False)
        seconds += time.perf_counter() - start
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    split = {}
    if counters_before is not None:
        after = _fused_counters(llm)
        steps = after["steps"] - counters_before["steps"]
        split = {phase: (after["phase_seconds"][phase] - counters_before["phase_seconds"][phase]) / steps
                 for phase in STEP_PHASES} if steps else {}
    return RunResult(seconds, tokens, _read_metrics(llm)[0] - before, _peak_rss_bytes(), split)


def _fused_counters(llm: Any) -> dict[str, Any] | None:
    """The fused runner's counters (first worker), or None without the plugin or with ``fused: false``."""
    if os.environ.get("VLLM_PLUGINS") == PLUGINS_OFF:
        return None
    from vllm_mtp_gemma4.worker.v1.runner import fused_step_counters

    counters = llm.collective_rpc(fused_step_counters)[0]
    return counters if counters["fused"] else None


def serve(reply_fd: int) -> None:
    """Worker side of ``EngineWorker``: start the engine, then answer one request per stdin line."""
    from vllm import LLM

    llm = LLM(**_engine_defaults(json.loads(sys.stdin.readline())["engine"]))
    cache = llm.llm_engine.vllm_config.cache_config
    with os.fdopen(reply_fd, "w") as replies:
        replies.write(json.dumps({"kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}) + "\n")
        replies.flush()
        for line in sys.stdin:
            replies.write(json.dumps(asdict(_timed_pass(llm, **json.loads(line)))) + "\n")
            replies.flush()


def main() -> None:
    if sys.argv[1] == "--worker":
        serve(int(sys.argv[2]))
        return
    job = Job(**json.loads(sys.stdin.read()))
    result = run_in_process(job)
    Path(sys.argv[1]).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
