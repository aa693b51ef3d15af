"""Every change the plugin makes to vLLM internals, in one place. Checked against vLLM 0.32.0.

Each patch is applied once per process by ``apply()`` (called from ``plugin.register``) and says
why it exists. Bumping vLLM means re-reading each of these against the new sources.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from vllm_mtp_gemma4.config import SECTION, MTPConfigError, load_speculative_config, resolve
from vllm_mtp_gemma4.metrics import record_proposer

_applied = False


def _accept_config_file_in_cli() -> None:
    """``--speculative-config`` takes a JSON file path as well as inline JSON.

    vLLM 0.32 parses the flag with ``json.loads`` (``EngineArgs.add_cli_args``), so a path fails in
    argparse. We keep the raw string; ``_resolve_speculative_config`` loads it, with errors that name
    the file, line and column. General plugins load before ``EngineArgs.add_cli_args`` runs
    (``AsyncEngineArgs.add_cli_args`` calls ``load_general_plugins`` first).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args

    def add_cli_args(parser, *args: Any, **kwargs: Any):
        parser = original(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings:
                action.type = str
                action.help = (action.help or "") + " Also a path to a JSON file (vllm-mtp-gemma4)."
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args)


def _resolve_speculative_config() -> None:
    """Load, validate and split the speculative config before vLLM builds its configs.

    ``EngineArgs.create_engine_config`` is the one point that ``LLM(...)``, ``vllm serve`` and
    ``AsyncLLM`` all pass through before any weights load. vLLM's ``SpeculativeConfig`` forbids
    unknown keys, so the plugin's section moves to ``additional_config`` (which reaches every worker).
    """
    from vllm.config import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    allowed = {f.name for f in dataclasses.fields(SpeculativeConfig)}

    def create_engine_config(self, *args: Any, **kwargs: Any):
        if self.speculative_config is not None:
            spec = load_speculative_config(self.speculative_config)
            self.speculative_config, plugin_config = resolve(spec, self.model, allowed)
            if plugin_config is not None:
                self.additional_config = {**(self.additional_config or {}), SECTION: plugin_config.to_dict()}
                record_proposer(self.speculative_config["num_speculative_tokens"], self.speculative_config["model"])
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


def _use_plugin_proposer() -> None:
    """Draft with the plugin's Gemma 4 MTP proposer wherever vLLM would use its own.

    ``GPUModelRunner.__init__`` (which ``CPUModelRunner`` inherits) builds ``Gemma4Proposer`` by its
    module-level name when ``speculative_config.use_gemma4_mtp()``. Ours subclasses it, so the
    runner's ``isinstance`` checks (block tables per KV group, hidden states) still hold.
    """
    from vllm.v1.worker import gpu_model_runner

    from vllm_mtp_gemma4.worker.proposer import Gemma4MTPProposer

    gpu_model_runner.Gemma4Proposer = Gemma4MTPProposer


def _one_line_config_errors() -> None:
    """An ``MTPConfigError`` that reaches the top of ``vllm serve`` prints one line, not a traceback.

    The error is raised in the API server process before any weights load; exit status stays 1.
    """
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        if isinstance(value, MTPConfigError):
            print(f"error: {value}", file=sys.stderr)
            return
        previous(kind, value, tb)

    sys.excepthook = excepthook


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    _accept_config_file_in_cli()
    _resolve_speculative_config()
    _use_plugin_proposer()
    _one_line_config_errors()
