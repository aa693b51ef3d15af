"""Engine scenarios that need a process of their own: ``python -m tests.engine_scenarios NAME`` prints
``RESULT {json}``.

- ``async_from_sync``: ``AsyncLLM.from_engine_args`` called from plain sync code (no running event loop, as in a Ray
  Serve replica's constructor), then served by ``asyncio.run``: four streams cut after two outputs each, then one
  request to its end. Reports the drafter info, the phase state left after the cuts, and the labels of the
  plugin's phase counters next to vLLM's own ``vllm:spec_decode_num_drafts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from .conftest import ENGINE, mtp_config, thinking_prompts

SERVED_NAME = "gemma4-tiny"


def labels_of(name: str) -> list[dict[str, str]]:
    from prometheus_client import REGISTRY

    return [dict(sample.labels) for family in REGISTRY.collect() if family.name in (name, name.removesuffix("_total"))
            for sample in family.samples]


def async_from_sync() -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_mtp_gemma4.metrics import PROPOSER_INFO

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**ENGINE, speculative_config=mtp_config(3),
                                                       served_model_name=SERVED_NAME))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in thinking_prompts()[:4]]
    tracker = engine.output_processor._mtp_gemma4_phases
    result: dict = {}

    async def cut(i: int) -> int:
        outputs = 0
        stream = engine.generate(prompts[i], SamplingParams(temperature=0.0, max_tokens=200), request_id=f"cut-{i}")
        async with contextlib.aclosing(stream):  # closing the stream aborts the request, as a client leaving does
            async for _ in stream:
                outputs += 1
                if outputs == 2:
                    return 1
        return 0

    async def main() -> None:
        result["cut"] = sum(await asyncio.gather(*(cut(i) for i in range(len(prompts)))))
        await asyncio.sleep(1.0)  # the engine's last outputs for the cut requests, if any, arrive
        result["tracked_after_cut"] = len(tracker.thinking)
        async for _ in engine.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=24), request_id="full"):
            pass
        await engine._mtp_gemma4_report
        result["tracked_after_all"] = len(tracker.thinking)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    result["drafters"] = sorted(PROPOSER_INFO.drafters)
    result["phase_labels"] = labels_of("vllm:mtp_gemma4_spec_steps")
    result["vllm_labels"] = labels_of("vllm:spec_decode_num_drafts")
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps({"async_from_sync": async_from_sync}[sys.argv[1]]()), flush=True)
