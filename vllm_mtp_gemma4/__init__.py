"""vLLM plugin for fast speculative decoding of Gemma 4 with its MTP assistant."""

__version__ = "0.1.0"
