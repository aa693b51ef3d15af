"""Concurrent streaming load against an OpenAI-compatible server, with latency percentiles.

Used by the serving tests (bounded, on loopback) and on its own to compare the plugin with plain decoding:

    python -m vllm_mtp_gemma4.bench.load --clients 64 --requests 192 --out benchmarks/results/load

which starts ``vllm serve`` for each of plain decoding and the plugin in turn, runs the same load and writes
``load.json`` with p50/p99 time-to-first-token and inter-token latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_mtp_gemma4.bench import FIXTURE_DIR

MODEL_NAME = "gemma4-tiny"
JSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "done": {"type": "boolean"}},
    "required": ["name", "done"],
    "additionalProperties": False,
}
# Compact JSON: a tiny model left free to emit whitespace between fields can fill max_tokens with it.
SERVE_ARGS = ("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')


@dataclass
class RequestResult:
    kind: str
    finish_reason: str | None = None
    error: str | None = None
    ttft: float | None = None  # seconds to the first content token
    itl: list[float] = field(default_factory=list)  # seconds between later content chunks
    text: str = ""


def mixed_requests(count: int, long_prompt: str) -> list[dict[str, Any]]:
    """Greedy and sampled, short and long, seeded, and JSON-schema requests, in a fixed rotation."""
    kinds = [
        ("greedy-short", {"prompt": "def fibonacci(n):\n", "max_tokens": 16, "temperature": 0}),
        ("sampled-long", {"prompt": "import os\n", "max_tokens": 96, "temperature": 0.8, "top_p": 0.9}),
        ("seeded-long-prompt", {"prompt": long_prompt, "max_tokens": 32, "temperature": 0.8, "seed": 7}),
        ("json", {"messages": [{"role": "user", "content": "Give a name and whether it is done, as JSON."}],
                  "max_tokens": 64, "temperature": 0,
                  "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "item", "schema": JSON_SCHEMA}}}),
        ("greedy-long", {"prompt": "class Stack:\n", "max_tokens": 128, "temperature": 0}),
        ("sampled-short", {"messages": [{"role": "user", "content": "Write `def quote(s):` from shlex."}],
                           "max_tokens": 24, "temperature": 1.0, "seed": 11}),
    ]
    return [{"kind": kinds[i % len(kinds)][0], **kinds[i % len(kinds)][1]} for i in range(count)]


async def _one(client: Any, request: dict[str, Any]) -> RequestResult:
    body = {k: v for k, v in request.items() if k != "kind"}
    result = RequestResult(kind=request["kind"])
    start = last = time.perf_counter()
    try:
        if "messages" in body:
            stream = await client.chat.completions.create(model=MODEL_NAME, stream=True, **body)
        else:
            stream = await client.completions.create(model=MODEL_NAME, stream=True, **body)
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            piece = choice.delta.content if "messages" in body else choice.text
            if piece:
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.text += piece
            if choice.finish_reason:
                result.finish_reason = choice.finish_reason
    except Exception as e:  # noqa: BLE001 (every failure is a result to report)
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(base_url: str, requests: list[dict[str, Any]], clients: int) -> list[RequestResult]:
    """``clients`` concurrent streaming clients work through ``requests``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600, max_retries=0)
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[RequestResult] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await _one(client, queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    return results


def percentiles(results: list[RequestResult]) -> dict[str, float]:
    """p50/p99 of time to first token and inter-token latency, in milliseconds."""
    ttft = sorted(r.ttft for r in results if r.ttft is not None)
    itl = sorted(x for r in results for x in r.itl)

    def pct(xs: list[float], q: float) -> float:
        return round(1e3 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else float("nan")

    return {"ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(itl, 0.5), "itl_p99_ms": pct(itl, 0.99),
            "mean_itl_ms": round(1e3 * statistics.mean(itl), 2) if itl else float("nan")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve`` of the fixture (or ``model``) on a free loopback port, as a process group we stop ourselves."""

    def __init__(self, log_path: Path, speculative: bool, plugins: bool = True, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, model: Path = FIXTURE_DIR / "target"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", MODEL_NAME,
                "--reasoning-parser", "gemma4", "--max-model-len", "4096", "--gpu-memory-utilization", "0.2",
                *SERVE_ARGS, *extra]
        if speculative:
            args += ["--speculative-config", str(Path(__file__).resolve().parents[2] / "configs" / "mtp.json")]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **(env or {})}
        if not plugins:
            from vllm_mtp_gemma4.bench.job import PLUGINS_OFF

            env["VLLM_PLUGINS"] = PLUGINS_OFF
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=Path(__file__).resolve().parents[2], start_new_session=True)

    def wait_ready(self, timeout: float = 400) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve not ready in {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def long_prompt() -> str:
    """About 1,500 tokens of held-out code: long enough to prefill in several chunks."""
    return "".join(json.loads((FIXTURE_DIR / "held_out_prompts.json").read_text()))[:5000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load"))
    parser.add_argument("--methods", default="plain,plugin", help="comma-separated: plain, plugin")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    requests = mixed_requests(args.requests, long_prompt())
    report: dict[str, Any] = {"command": " ".join(["python -m vllm_mtp_gemma4.bench.load", *sys.argv[1:]]),
                              "clients": args.clients, "requests": args.requests}
    for name in args.methods.split(","):
        speculative = name == "plugin"
        with Server(args.out / f"{name}.log", speculative) as server:
            asyncio.run(run_load(server.url, requests[: args.clients], args.clients))  # warm-up
            start = time.perf_counter()
            results = asyncio.run(run_load(server.url, requests, args.clients))
            seconds = time.perf_counter() - start
        errors = [r.error for r in results if r.error]
        report[name] = {**percentiles(results), "seconds": round(seconds, 1), "errors": len(errors),
                        "first_error": errors[0] if errors else None,
                        "completed": sum(r.finish_reason is not None for r in results)}
        print(name, report[name], flush=True)
    (args.out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_latencies(report, args.out / "latency.png")


def plot_latencies(report: dict[str, Any], path: Path) -> None:
    """Bars of p50/p99 time to first token and inter-token latency, one group per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("plain", "plugin") if m in report]
    keys = ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        ax.bar([k + i * width for k in range(len(keys))], [report[method][key] for key in keys], width, label=method)
    ax.set_xticks([k + width * (len(methods) - 1) / 2 for k in range(len(keys))],
                  ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"])
    ax.set_ylabel("ms")
    ax.set_title(f"{report['clients']} streaming clients, {report['requests']} mixed requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
