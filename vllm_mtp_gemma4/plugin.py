"""Registration with vLLM: the only module that touches vLLM's registries.

vLLM calls ``register()`` through the ``vllm.general_plugins`` entry point in every process
(API server, engine core, workers, Ray actors), sometimes more than once per process, so it
must be idempotent.
"""

from __future__ import annotations

import os

from vllm_mtp_gemma4 import __version__

PLUGIN_NAME = "mtp_gemma4"
DRAFT_ARCHITECTURE = "Gemma4MTPModel"
_registered_pid: int | None = None


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call any number of times."""
    global _registered_pid
    if _registered_pid == os.getpid():
        return
    _registered_pid = os.getpid()

    from vllm import ModelRegistry

    from vllm_mtp_gemma4 import patches
    from vllm_mtp_gemma4.log import get_logger

    # The assistant architecture vLLM resolves ``gemma4_assistant`` checkpoints to, with replicated projections.
    ModelRegistry.register_model(DRAFT_ARCHITECTURE, "vllm_mtp_gemma4.models.gemma4_mtp:Gemma4MTP")
    patches.apply()
    get_logger(__name__).info("vllm-mtp-gemma4 %s plugin loaded (pid %d)", __version__, os.getpid())


def is_registered() -> bool:
    """Whether ``register()`` has run in this process."""
    return _registered_pid == os.getpid()
