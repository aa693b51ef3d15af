"""``vllm serve`` with mtp.json for OpenAI clients: endpoints, features, load, faults and bad requests.

One server (the plugin, the fixture, ``--reasoning-parser gemma4``, a 256-token prefill budget so long prompts
prefill in chunks) runs for the whole module on a free loopback port; the official ``openai`` client talks to it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import requests
from openai import BadRequestError, NotFoundError, OpenAI

from vllm_mtp_gemma4.bench.load import (
    JSON_SCHEMA,
    MODEL_NAME,
    Server,
    long_prompt,
    mixed_requests,
    percentiles,
    run_load,
)

pytestmark = pytest.mark.engine
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serving") / "server.log"
    with Server(log, speculative=True, extra=("--enforce-eager", "--max-num-batched-tokens", "256")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def metric(server, name: str, labels: str = "") -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(server, timeout: float = 60) -> None:
    """Until no request runs or waits and the KV cache is empty again."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:num_requests_waiting") == 0
                and metric(server, "vllm:kv_cache_usage_perc") == 0):
            return
        time.sleep(0.5)
    raise AssertionError("server did not return to idle (requests or KV blocks left behind)")


def server_rss(server) -> int:
    root = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def assert_still_serving(client: OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="def f(x):\n", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- endpoints and features


@pytest.mark.parametrize("stream", [False, True])
def test_completions(client, stream):
    kwargs = {"model": MODEL_NAME, "prompt": "def fibonacci(n):\n", "max_tokens": 24, "temperature": 0}
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        out = client.completions.create(**kwargs)
        text = out.choices[0].text
        assert out.usage.completion_tokens == 24
    assert text == client.completions.create(**kwargs).choices[0].text  # greedy is deterministic


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_split_reasoning(client, stream):
    kwargs = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 200,
              "messages": [{"role": "user", "content": "Write `def rgb_to_hls(r, g, b):` from colorsys."}],
              "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
    if stream:
        reasoning = content = ""
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning += (delta.model_extra or {}).get("reasoning") or ""
                content += delta.content or ""
    else:
        msg = client.chat.completions.create(**kwargs).choices[0].message
        reasoning, content = (msg.model_extra or {}).get("reasoning") or "", msg.content or ""
    assert reasoning.strip() and "def " in content
    assert "<channel|>" not in content and "<|channel>" not in reasoning + content


def test_n_and_seed(client):
    kwargs = {"model": MODEL_NAME, "prompt": "import os\n", "max_tokens": 24, "temperature": 0.9, "seed": 5}
    first = client.completions.create(n=3, **kwargs)
    assert len(first.choices) == 3
    again = client.completions.create(n=3, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1, "n samples of one seeded request should differ"


def test_logprobs(client):
    out = client.completions.create(model=MODEL_NAME, prompt="def f(x):\n", max_tokens=8, temperature=0,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 8 and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(8))  # greedy: the top-1
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)


def test_stop_and_max_tokens(client):
    out = client.completions.create(model=MODEL_NAME, prompt="def fibonacci(n):\n", max_tokens=64, temperature=0,
                                    stop=["\n"])
    assert out.choices[0].finish_reason == "stop" and "\n" not in out.choices[0].text
    out = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_json_schema_output(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "Give a name and whether it is done, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": JSON_SCHEMA}},
    )
    data = json.loads(out.choices[0].message.content)
    assert set(data) == {"name", "done"} and isinstance(data["name"], str) and len(data["name"]) <= 12
    assert isinstance(data["done"], bool)


def test_min_p_and_logit_bias_work_with_speculation(client):
    """vLLM refuses both under speculation; the fused step applies them at every drafted position."""
    kwargs = {"model": MODEL_NAME, "prompt": "def fibonacci(n):\n", "max_tokens": 8, "temperature": 0,
              "logprobs": 1, "extra_body": {"return_tokens_as_token_ids": True}}
    first = client.completions.create(**kwargs).choices[0].logprobs.tokens
    banned = first[2].removeprefix("token_id:")
    biased = client.completions.create(**{**kwargs, "logit_bias": {banned: -100}}).choices[0].logprobs.tokens
    assert f"token_id:{banned}" not in biased and biased != first
    # min_p = 1 keeps only the most likely token, so sampling at T = 1 gives the greedy text; without it, not.
    sampled = {**kwargs, "temperature": 1.0, "seed": 3, "max_tokens": 24}
    only_top = client.completions.create(**{**sampled, "extra_body": {"return_tokens_as_token_ids": True,
                                                                       "min_p": 1.0}})
    free = client.completions.create(**sampled)
    greedy = client.completions.create(**{**kwargs, "max_tokens": 24})
    assert only_top.choices[0].text == greedy.choices[0].text != free.choices[0].text


def test_vllm_xargs_per_request(client, server):
    """Relaxed acceptance asked for by one request: its thinking is counted, and the reasoning parser still
    splits reasoning from the answer."""
    before = metric(server, "vllm:mtp_gemma4_spec_steps_total", 'phase="thinking"')
    out = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=200,
        messages=[{"role": "user", "content": "Write `def rgb_to_hls(r, g, b):` from colorsys."}],
        extra_body={"chat_template_kwargs": {"enable_thinking": True},
                    "vllm_xargs": {"relaxed_acceptance": True, "relaxed_topk": 5, "relaxed_delta": 0.5}},
    )
    msg = out.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning") or ""
    assert reasoning.strip() and msg.content and "def " in msg.content
    assert "<channel|>" not in msg.content and "<|channel>" not in reasoning + msg.content
    assert metric(server, "vllm:mtp_gemma4_spec_steps_total", 'phase="thinking"') > before


def test_metrics_show_acceptance(client, server):
    client.completions.create(model=MODEL_NAME, prompt="def fibonacci(n):\n", max_tokens=32, temperature=0)
    assert metric(server, "vllm:spec_decode_num_drafts_total") > 0
    assert metric(server, "vllm:spec_decode_num_accepted_tokens_total") > 0
    assert metric(server, "vllm:mtp_gemma4_proposer_info") == 1
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    # vLLM's model_name and engine labels, then the phase
    assert re.search(r'^vllm:mtp_gemma4_accepted_tokens_total\{[^}]*phase="answer"\} [1-9]', text, re.M)


# ---------------------------------------------------------------- bad requests: 4xx, and the server keeps serving


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"logit_bias": {str(i): 1.0 for i in range(10_000)}}, "in logit_bias contain out-of-vocab token ids"),
    ({"extra_body": {"vllm_xargs": {"relaxed_topk": 0}}}, "relaxed_topk"),
    ({"extra_body": {"vllm_xargs": {"relaxed_delta": 2}}}, "relaxed_delta"),
    ({"extra_body": {"vllm_xargs": {"relaxed_acceptance": "yes"}}}, "relaxed_acceptance"),
    ({"extra_body": {"vllm_xargs": {"num_speculative_tokens": -1}}}, "num_speculative_tokens: must be an integer"),
    ({"prompt": "x " * 5000, "max_tokens": 16}, "maximum context length"),
    ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
])
def test_bad_request_is_a_400_naming_the_field(client, kwargs, field):
    args = {"model": MODEL_NAME, "prompt": "def f(x):\n", "max_tokens": 4, **kwargs}
    with pytest.raises(BadRequestError) as e:
        client.completions.create(**args)
    assert field in str(e.value)
    assert_still_serving(client)


def test_malformed_json_and_unknown_model(client, server):
    r = requests.post(f"{server.url}/v1/completions", data="{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert_still_serving(client)


# ---------------------------------------------------------------- disconnects


def _open_and_drop(url: str, chunks: int) -> None:
    body = {"model": MODEL_NAME, "prompt": "class Stack:\n", "max_tokens": 400, "temperature": 0.7, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= chunks:
                break  # leaving the block closes the connection mid-stream


def test_client_disconnect_aborts_and_frees_blocks(client, server):
    wait_idle(server)
    _open_and_drop(server.url, 3)
    wait_idle(server)
    assert_still_serving(client)


def test_many_disconnects_at_once(client, server):
    async def drop_all() -> None:
        await asyncio.gather(*(asyncio.to_thread(_open_and_drop, server.url, 1 + i % 4) for i in range(32)))

    asyncio.run(drop_all())
    wait_idle(server)
    assert_still_serving(client)


# ---------------------------------------------------------------- load


def test_64_concurrent_streaming_clients(client, server, record_property):
    """192 mixed requests (greedy/sampled, short/long, seeded long prompts in chunked prefill, JSON schema) from
    64 streaming clients: all finish, none fails, the KV cache empties, resident memory stays flat (within 10 %
    after a warm-up round)."""
    requests_ = mixed_requests(192, long_prompt())
    asyncio.run(run_load(server.url, requests_[:64], 64))  # warm-up: first-call allocations
    wait_idle(server)
    rss_before = server_rss(server)
    results = asyncio.run(run_load(server.url, requests_, 64))
    errors = [r.error for r in results if r.error]
    assert not errors, errors[:3]
    assert len(results) == 192 and all(r.finish_reason in ("stop", "length") for r in results)
    for r in results:
        if r.kind == "json":
            json.loads(r.text)
    wait_idle(server)
    rss_after = server_rss(server)
    assert rss_after < 1.10 * rss_before, f"resident memory grew from {rss_before >> 20} to {rss_after >> 20} MiB"
    figures = percentiles(results)
    print(f"\nload: {figures}, rss {rss_before >> 20} -> {rss_after >> 20} MiB")
    record_property("load", figures)


def test_data_parallel_ranks_serve_greedy_like_plain_decoding(tmp_path, held_out_prompts, plain_greedy):
    """``--data-parallel-size 2``: two engine cores behind one front end, each drafting with the fused step (its
    skipped-draft path joins the drafter's collectives, as vLLM's does); concurrent greedy requests spread over both
    ranks get plain decoding's text."""
    prompts = held_out_prompts[:6]
    extra = ("--enforce-eager", "--dtype", "float32", "--data-parallel-size", "2")
    with Server(tmp_path / "dp.log", speculative=True, extra=extra, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as s:
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)

        def complete(prompt: str) -> str:
            return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=64,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(complete, prompts))
        drafts = metric(s, "vllm:spec_decode_num_drafts_total")
        log = (tmp_path / "dp.log").read_text()
    assert texts == plain_greedy.texts[:len(prompts)]
    assert drafts > 0
    assert log.count("vllm-mtp-gemma4: fused target-verify step on") == 2  # one runner per DP rank
