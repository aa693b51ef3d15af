"""Model Runner V2 (``vllm/v1/worker/gpu/``; the CUDA default): V2 keeps its own step, speculator and rejection
sampler; the plugin adds relaxed acceptance as a V2 logits processor and its assistant class (registered model)."""

RELAXED_PROCESSOR = "vllm_mtp_gemma4.worker.v2.relaxed:RelaxedAcceptanceProcessor"
"""Added to ``ModelConfig.logits_processors`` of the plugin's engines that run V2 (``patches``)."""
