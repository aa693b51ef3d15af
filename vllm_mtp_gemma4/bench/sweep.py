"""The benchmark sweep: the methods compared, their prompts, and the interleaved order of timed passes.

One engine per (method, K) stays alive while it is measured (``EngineWorker``); the engines without
speculation (plain decoding, and its variants) have no K and live through the whole sweep. Passes run
with repeats outermost and methods innermost, so slow drifts of a shared machine hit every method
alike, and every speculative pass has a plain pass of the same round, batch size and temperature to
be divided by.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_mtp_gemma4.bench.job import EngineWorker, RunResult


@dataclass(frozen=True)
class Method:
    """How one compared method sets up its engine. A variant of the plugin is one more row."""

    plugins: bool  # False runs vLLM as shipped (VLLM_PLUGINS names no installed plugin)
    speculative: bool  # drafts K tokens per step with the fixture's assistant
    # Merged into speculative_config, e.g. {"vllm_mtp_gemma4": {...}} for the plugin's own settings.
    speculative_extra: dict[str, Any] = field(default_factory=dict)
    engine_extra: dict[str, Any] = field(default_factory=dict)  # merged into the LLM(...) arguments
    env: dict[str, str] = field(default_factory=dict)  # the engine process's extra environment


# Two ranks with the ``mp`` backend, one core each (vLLM's CPU TP needs an explicit core binding per rank).
TP2 = {"engine_extra": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
       "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


METHODS: dict[str, Method] = {
    "plain": Method(plugins=False, speculative=False),  # the baseline: vLLM, no speculation
    "upstream": Method(plugins=False, speculative=True),  # vLLM's own Gemma 4 MTP
    "plugin": Method(plugins=True, speculative=True),  # the plugin's fused step (its defaults)
    "plugin-unfused": Method(plugins=True, speculative=True, speculative_extra={"vllm_mtp_gemma4": {"fused": False}}),
    # K is the maximum: each step runs 0..K draft steps and each request verifies 0..K drafts.
    "plugin-adaptive": Method(plugins=True, speculative=True,
                              speculative_extra={"vllm_mtp_gemma4": {"adaptive_k": True}}),
    # K drafts every step, whatever the default.
    "plugin-fixed": Method(plugins=True, speculative=True,
                           speculative_extra={"vllm_mtp_gemma4": {"adaptive_k": False}}),
    "plain-tp2": Method(plugins=False, speculative=False, **TP2),
    "plugin-tp2": Method(plugins=True, speculative=True, **TP2),
}
BASELINE = "plain"
REFERENCE = "upstream"  # what the plugin's variants are divided by

# Held-out standard-library functions (never trained on), asked for in a chat turn that opens a
# thinking block: the serving shape of a request, next to the raw-code held-out prompts.
CHAT_FUNCTIONS = (
    ("bisect", "def insort_left(a, x, lo=0, hi=None, *, key=None):"),
    ("colorsys", "def rgb_to_hls(r, g, b):"),
    ("heapq", "def heappushpop(heap, item):"),
    ("shlex", "def split(s, comments=False, posix=True):"),
    ("textwrap", "def dedent(text):"),
    ("bisect", "def bisect_right(a, x, lo=0, hi=None, *, key=None):"),
    ("colorsys", "def hsv_to_rgb(h, s, v):"),
    ("heapq", "def nsmallest(n, iterable, key=None):"),
    ("shlex", "def quote(s):"),
    ("textwrap", "def indent(text, prefix, predicate=None):"),
)
CHAT_EVERY = 4  # one chat prompt in every 4, so every batch size sees both kinds
WARMUP_TOKENS = 4


@dataclass
class Settings:
    mode: str
    fixture: Path
    batches: list[int]
    ks: list[int]
    temperatures: list[float]
    repeats: int
    max_tokens: int
    num_prompts: int
    eager: bool
    dtype: str = "float32"  # the fixture's weights are bf16, computed in fp32
    max_model_len: int = 2048
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    # A speculative method named here runs at these Ks only (the others at every K of ``ks``).
    method_ks: dict[str, list[int]] = field(default_factory=dict)

    def runs(self, method: str, k: int) -> bool:
        return k in self.method_ks.get(method, self.ks)

    @property
    def default_k(self) -> int:
        """The K shown where a figure picks one: 3 when swept (vLLM's usual MTP depth)."""
        return 3 if 3 in self.ks else self.ks[0]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fixture": str(self.fixture)}


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    """Token ids of one user turn per CHAT_FUNCTIONS entry, the model turn opened with thinking on."""
    prompts = []
    for module, signature in CHAT_FUNCTIONS:
        messages = [{"role": "user", "content": f"Write `{signature}` from {module}."}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=True)
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)  # the template has <bos>
    return prompts


def build_prompts(fixture: Path, count: int) -> list[list[int]]:
    """``count`` prompts as token ids: held-out code, with every CHAT_EVERY-th a thinking chat turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture / "target")
    held_out = [tokenizer(p).input_ids for p in json.loads((fixture / "held_out_prompts.json").read_text())]
    held, chats = itertools.cycle(held_out), itertools.cycle(chat_prompts(tokenizer))
    return [next(chats if i % CHAT_EVERY == CHAT_EVERY - 1 else held) for i in range(count)]


def engine_args(settings: Settings, method: Method, k: int | None) -> dict[str, Any]:
    engine = {"model": str(settings.fixture / "target"), "dtype": settings.dtype,
              "max_model_len": settings.max_model_len, "enforce_eager": settings.eager}
    if method.speculative:
        engine["speculative_config"] = {"method": "mtp", "model": str(settings.fixture / "assistant"),
                                        "num_speculative_tokens": k, **method.speculative_extra}
    return {**engine, **method.engine_extra}


def sampling(temperature: float, max_tokens: int) -> dict[str, Any]:
    # Every request generates exactly max_tokens, so all methods do the same work whatever they sample.
    return {"temperature": temperature, "max_tokens": max_tokens, "ignore_eos": True}


def total_steps(settings: Settings) -> int:
    """Engine starts plus timed passes, for the progress bar."""
    unspeculative = _unspeculative(settings)
    engines = sum(settings.runs(m, k) for m in settings.methods if METHODS[m].speculative for k in settings.ks)
    per_group = settings.repeats * len(settings.temperatures) * len(settings.batches)
    return len(unspeculative) + engines + per_group * (len(settings.ks) * len(unspeculative) + engines)


def _unspeculative(settings: Settings) -> list[str]:
    """The methods without K, started once for the whole sweep; plain decoding always, as every ratio's divisor."""
    return [BASELINE] + [m for m in settings.methods if not METHODS[m].speculative and m != BASELINE]


@dataclass
class Sweep:
    """What a sweep measured: one record per engine and one per timed pass."""

    engines: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)


def run_sweep(settings: Settings, log_dir: Path, progress: tqdm) -> Sweep:
    """Start the engines group by group (one group per K) and time every pass."""
    prompts = build_prompts(settings.fixture, settings.num_prompts)
    log_dir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep()
    with ExitStack() as whole:
        unspeculative = {name: whole.enter_context(_start(settings, name, None, prompts, log_dir, sweep, progress))
                         for name in _unspeculative(settings)}
        for k in settings.ks:
            with ExitStack() as group:
                workers = dict(unspeculative)
                for name in settings.methods:
                    if METHODS[name].speculative and settings.runs(name, k):
                        workers[name] = group.enter_context(
                            _start(settings, name, k, prompts, log_dir, sweep, progress))
                _measure_group(settings, k, workers, prompts, sweep, progress)
    return sweep


@contextmanager
def _start(settings: Settings, name: str, k: int | None, prompts: list[list[int]], log_dir: Path,
           sweep: Sweep, progress: tqdm) -> Iterator[EngineWorker]:
    progress.set_description(f"start {name}" + (f" K={k}" if k else ""))
    method = METHODS[name]
    start = time.perf_counter()
    log_path = log_dir / (f"{name}-k{k}.log" if k else f"{name}.log")
    with EngineWorker(engine_args(settings, method, k), log_path, plugins=method.plugins, env=method.env) as worker:
        for temperature in settings.temperatures:  # untimed: first-call costs of each sampler and shape
            for batch in settings.batches:
                worker.generate(prompts[:batch], sampling(temperature, WARMUP_TOKENS), batch)
        sweep.engines.append({"method": name, "k": k, **worker.info, "peak_rss_bytes": 0,
                              "start_seconds": round(time.perf_counter() - start, 1),
                              "log": str(log_path.relative_to(log_dir.parent))})
        progress.update()
        yield worker


def _measure_group(settings: Settings, k: int, workers: dict[str, EngineWorker], prompts: list[list[int]],
                   sweep: Sweep, progress: tqdm) -> None:
    names, turn = list(workers), 0
    for repeat in range(settings.repeats):
        for temperature in settings.temperatures:
            for batch in settings.batches:
                # Rotate which method goes first, so none always follows the same neighbour.
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    progress.set_description(f"K={k} T={temperature} b={batch} {name}")
                    params = sampling(temperature, settings.max_tokens)
                    result = workers[name].generate(prompts, params, batch)
                    _record(sweep, name, k, repeat, batch, temperature, result)
                    progress.update()
                turn += 1


def _record(sweep: Sweep, name: str, k: int, repeat: int, batch: int, temperature: float,
            result: RunResult) -> None:
    speculative = METHODS[name].speculative
    sweep.passes.append({
        "method": name, "k": k if speculative else None, "group_k": k, "repeat": repeat,
        "batch": batch, "temperature": temperature, "seconds": result.seconds,
        "tokens": result.generated_tokens, "spec": asdict(result.spec),
        "step_time_split": result.step_time_split,
    })
    engine = next(e for e in sweep.engines if e["method"] == name and e["k"] == (k if speculative else None))
    engine["peak_rss_bytes"] = max(engine["peak_rss_bytes"], result.peak_rss_bytes)
