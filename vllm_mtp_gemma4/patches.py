"""Every change the plugin makes to vLLM internals, in one place. Checked against vLLM 0.32.0.

Each patch is applied once per process by ``apply()`` (called from ``plugin.register``) and says
why it exists. Bumping vLLM means re-reading each of these against the new sources.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from contextlib import contextmanager
from typing import Any

from vllm_mtp_gemma4.config import (
    SECTION,
    MTPConfigError,
    PluginConfig,
    check_draft_parallelism,
    check_request_limits,
    check_request_options,
    load_speculative_config,
    resolve,
    thinking_marker_ids,
)
from vllm_mtp_gemma4.metrics import PHASE_ACCEPTANCE, record_proposer

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
                check_draft_parallelism(self.speculative_config, self.tensor_parallel_size)
                self.additional_config = {**(self.additional_config or {}), SECTION: plugin_config.to_dict()}
                if plugin_config.fused:
                    # The fused step reads the device once per step itself; vLLM's async scheduling
                    # would overlap a second, speculative copy of the same outputs.
                    self.async_scheduling = False
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


def _use_fused_runner() -> None:
    """Run the fused target-verify step: vLLM's runner classes, swapped where the workers build them.

    ``CPUWorker.init_device`` builds ``CPUModelRunner`` by its module-level name in ``cpu_worker``;
    ``Worker._make_model_runner`` builds the V1 ``GPUModelRunner`` by a local import, so it is wrapped.
    Both fused runners defer to vLLM's unchanged when the plugin's proposer is not drafting.
    """
    from vllm.v1.worker import cpu_worker, gpu_worker

    from vllm_mtp_gemma4.worker.runner import FusedCPUModelRunner, FusedGPUModelRunner

    cpu_worker.CPUModelRunner = FusedCPUModelRunner
    original = gpu_worker.Worker._make_model_runner

    def _make_model_runner(self):
        if self.use_v2_model_runner or type(self) is not gpu_worker.Worker:
            return original(self)
        return FusedGPUModelRunner(self.vllm_config, self.device)

    gpu_worker.Worker._make_model_runner = _make_model_runner


def _ray_on_cpu() -> None:
    """Ray as the distributed executor on CPU nodes, which vLLM 0.32 refuses ("current platform cpu does not
    support ray": ``CpuPlatform.ray_device_key`` is empty).

    - ``CpuPlatform.ray_device_key`` becomes the custom resource ``vllm_cpu``. Ray refuses ``"CPU"`` where
      the executor puts the key (``resources={key: n}`` on each worker actor).
    - ``ray_executor_v2.RayWorkerProc`` (the actor class, built by its module-level name) becomes
      ``CPURayWorkerProc``, whose ``get_node_and_physical_gpu_ids`` does not look up accelerator ids.
    - ``ray_executor_v2.initialize_ray_cluster`` first connects (or, with no cluster to join, starts a local
      one with one ``vllm_cpu`` per core) and fails at once, naming the resource, when the cluster has fewer
      units free than ranks; vLLM would wait ``PG_WAIT_TIMEOUT`` (30 min) for a placement group that cannot
      form.
    This is vLLM 0.32's default Ray executor (``RayExecutorV2``); the legacy one
    (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``) is not covered.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or importlib.util.find_spec("ray") is None:  # ray is the `distributed` extra
        return
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2

    from vllm_mtp_gemma4.worker.ray_cpu import RAY_CPU_RESOURCE, CPURayWorkerProc

    CpuPlatform.ray_device_key = RAY_CPU_RESOURCE
    ray_executor_v2.RayWorkerProc = CPURayWorkerProc
    original = ray_executor_v2.initialize_ray_cluster

    def initialize_ray_cluster(parallel_config, ray_address: str | None = None, **kwargs: Any):
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=ray_address or "auto", runtime_env=parallel_config.ray_runtime_env)
            except ConnectionError:  # no cluster to join: a local one, one rank per core at most
                ray.init(runtime_env=parallel_config.ray_runtime_env,
                         resources={RAY_CPU_RESOURCE: len(os.sched_getaffinity(0))})
        free = ray.available_resources().get(RAY_CPU_RESOURCE, 0)
        if parallel_config.world_size > free and parallel_config.placement_group is None:
            raise ValueError(
                f"Ray cluster has {free:g} free '{RAY_CPU_RESOURCE}' of the {parallel_config.world_size} that "
                f"tensor_parallel_size x pipeline_parallel_size needs: start each CPU node with "
                f"`ray start --resources '{{\"{RAY_CPU_RESOURCE}\": N}}'` (N ranks it may host), or use fewer ranks")
        return original(parallel_config, ray_address, **kwargs)

    ray_executor_v2.initialize_ray_cluster = initialize_ray_cluster


@contextmanager
def _spec_decode_allows_min_p_and_logit_bias():
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_spec_decode
    SamplingParams._validate_spec_decode = lambda self, speculative_config: None
    try:
        yield
    finally:
        SamplingParams._validate_spec_decode = original


def _validate_requests() -> None:
    """Per-request plugin options (``extra_args`` / ``vllm_xargs``) are checked at admission: a 400, not a crash.

    So are two bounds vLLM 0.32 leaves open: ``n`` above ``max_num_seqs`` and ``logit_bias`` token ids outside
    the vocabulary.

    ``InputProcessor._validate_params`` runs in the front end for ``LLM`` and the OpenAI server alike; its
    ``VLLMValidationError`` becomes an HTTP 400 naming the parameter. The fused step applies ``min_p`` and
    ``logit_bias`` at every drafted position, so vLLM's refusal of them under speculation is lifted there.
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params

    def _validate_params(self, params, supported_tasks):
        config = PluginConfig.from_additional_config(self.vllm_config.additional_config)
        if config is None or not isinstance(params, SamplingParams):
            return original(self, params, supported_tasks)
        try:
            check_request_options(params.extra_args, config)
            check_request_limits(params.n, params.logit_bias, self.vllm_config.scheduler_config.max_num_seqs,
                                 self.model_config.get_vocab_size())
        except MTPConfigError as e:
            field = str(e).split(":", 1)[0]
            raise VLLMValidationError(str(e), parameter=field, value=None) from None
        if not config.fused:
            return original(self, params, supported_tasks)
        with _spec_decode_allows_min_p_and_logit_bias():
            return original(self, params, supported_tasks)

    InputProcessor._validate_params = _validate_params


def _count_acceptance_by_phase() -> None:
    """Feed ``PHASE_ACCEPTANCE`` from the front end's per-step outputs (``OutputProcessor.process_outputs``).

    The front end is where ``/metrics`` and ``LLM.get_metrics()`` read from, and it sees each request's tokens
    step by step, which is all the thinking/answer split needs.
    """
    from vllm.v1.engine.output_processor import OutputProcessor

    original = OutputProcessor.process_outputs

    def process_outputs(self, engine_core_outputs, *args: Any, **kwargs: Any):
        if PHASE_ACCEPTANCE.enabled and self.tokenizer is not None:
            if not hasattr(self, "_mtp_thinking_markers"):
                self._mtp_thinking_markers = thinking_marker_ids(self.tokenizer)
            markers = self._mtp_thinking_markers
            if None not in markers:
                for output in engine_core_outputs:
                    state = self.request_states.get(output.request_id)
                    PHASE_ACCEPTANCE.observe(output.request_id, state.prompt_token_ids if state else None,
                                             output.new_token_ids, output.finished, markers)
        return original(self, engine_core_outputs, *args, **kwargs)

    OutputProcessor.process_outputs = process_outputs


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
    _use_fused_runner()
    _ray_on_cpu()
    _validate_requests()
    _count_acceptance_by_phase()
    _one_line_config_errors()
