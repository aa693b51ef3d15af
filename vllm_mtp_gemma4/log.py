"""Loggers under vLLM's ``vllm`` logger, so plugin lines use vLLM's format, level and handlers."""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    """The logger for ``module`` (pass ``__name__``), named ``vllm.<module>``."""
    from vllm.logger import init_logger

    return init_logger(f"vllm.{module}")
