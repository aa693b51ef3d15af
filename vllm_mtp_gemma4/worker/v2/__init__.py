"""Model Runner V2 (``vllm/v1/worker/gpu/``; the CUDA default): V2 keeps its own step, speculator and rejection
sampler; the plugin adds relaxed acceptance as a V2 logits processor (``relaxed.py``, with the per-slot thinking
state of ``thinking_state.py``), its assistant class (registered model) and, for a centroid-masked assistant, the
sparse argmax of its head.

Read against vLLM 0.32.0 and 0.33.0: the V2 logits-processor interface (``sample/logits_processor/interface.py``)
is the same file in both; 0.33's sampler warm-up admits every slot with warm-up params and samples one row per
request, which the processor passes over (no drafts); 0.33 adds ``rejection_sample_method: "fly"``, which, as
every method but ``standard``, leaves relaxed acceptance unavailable (``forced_logits_readers``)."""

from __future__ import annotations

from typing import Any

from vllm_mtp_gemma4.config import SECTION, MTPConfigError, PluginConfig

RELAXED_PROCESSOR = "vllm_mtp_gemma4.worker.v2.relaxed:RelaxedAcceptanceProcessor"
"""Added to ``ModelConfig.logits_processors`` of the plugin's engines that run V2 (``fit_to_v2``)."""


def forced_logits_readers(config: Any) -> list[str]:
    """Settings under which the logits that relaxed acceptance forces would reach users (processed logprobs, a
    returned sampling mask) or a verifier that does not simply compare against them."""
    model_config, spec = config.model_config, config.speculative_config
    readers = []
    if model_config.logprobs_mode in ("processed_logprobs", "processed_logits"):
        readers.append(f"--logprobs-mode {model_config.logprobs_mode}")
    if getattr(model_config, "return_sampling_mask", False):
        readers.append("return_sampling_mask")
    if spec.rejection_sample_method != "standard":
        readers.append(f"rejection_sample_method {spec.rejection_sample_method!r}")
    return readers


def relaxed_unavailable(config: Any) -> str | None:
    """Why a request cannot have relaxed acceptance on this V2 engine (None: it can)."""
    readers = forced_logits_readers(config)
    return f"this server runs Model Runner V2 with {' and '.join(readers)}, which would expose it" if readers else None


def fit_to_v2(config: Any, plugin_config: PluginConfig) -> dict[str, str]:
    """The plugin's parts on V2, set before any weights load; returns their states for the start-up log.

    - Relaxed acceptance: the logits processor, unless a setting would read its forced logits; then a config that
      turns it on is refused, and requests that ask for it get a 400 (``patches._validate_requests``).
    - A centroid-masked assistant (E2B/E4B) drafts by its sparse argmax (``get_top_tokens``) at any TP, as at TP > 1,
      instead of scattering into full-vocabulary logits, wherever V2 needs no draft logits.
    """
    readers = forced_logits_readers(config)
    if readers and plugin_config.relaxed_acceptance:
        raise MTPConfigError(
            f"{SECTION}.relaxed_acceptance: on Model Runner V2 it raises accepted drafts' logits, which "
            f"{' and '.join(readers)} would expose; drop one of them")
    if not readers:
        model_config = config.model_config
        model_config.logits_processors = [*(model_config.logits_processors or []), RELAXED_PROCESSOR]
    spec = config.speculative_config
    if (getattr(spec.draft_model_config.hf_config, "use_ordered_embeddings", False)
            and spec.draft_sample_method != "probabilistic" and not spec.enable_adaptive_verification):
        spec.use_local_argmax_reduction = True
    relaxed = "on by default" if plugin_config.relaxed_acceptance else "per request"
    return {"relaxed acceptance": f"unavailable ({' and '.join(readers)})" if readers
            else f"{relaxed} (V2 logits processor)"}
