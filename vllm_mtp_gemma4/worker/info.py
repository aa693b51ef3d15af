"""What drafts in a worker, read from the live runner (``WorkerBase.mtp_gemma4_drafter_info``, added by ``patches``
and called through ``collective_rpc``), so the info metric reports what runs, from where it runs."""

from __future__ import annotations

from typing import Any


def drafter_info(worker: Any) -> dict[str, str] | None:
    """{runner, drafter, assistant, num_speculative_tokens} of this worker's runner; None where nothing drafts
    (no speculation, or a pipeline stage before the last)."""
    runner = worker.model_runner
    drafter = getattr(runner, "speculator", None)  # Model Runner V2
    name = "V2"
    if drafter is None:
        drafter, name = getattr(runner, "drafter", None), "V1"
    model = getattr(drafter, "model", None)
    if model is None:
        return None
    spec = runner.vllm_config.speculative_config
    fused = bool(getattr(runner, "fused", False))
    return {
        "runner": name,
        "drafter": type(drafter).__name__ + (" (fused step)" if fused else ""),
        "assistant": f"{type(model).__module__}.{type(model).__name__}",
        "num_speculative_tokens": str(spec.num_speculative_tokens),
    }
