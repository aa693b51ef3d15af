"""Every change the plugin makes to vLLM internals, in one place. Checked against vLLM 0.32.0.

Each patch is applied once per process by ``apply()`` (called from ``plugin.register``) and says
why it exists. Bumping vLLM means re-reading each of these against the new sources.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import importlib.util
import os
import sys
from typing import Any

from vllm_mtp_gemma4.config import (
    SECTION,
    MTPConfigError,
    PluginConfig,
    check_draft_cap,
    check_draft_parallelism,
    check_logit_bias,
    check_request_options,
    load_speculative_config,
    resolve,
    thinking_marker_ids,
)
from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.metrics import PHASE_ACCEPTANCE, record_drafters

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
    """Load, validate and split the speculative config before vLLM builds its configs, then fit it to the runner.

    ``EngineArgs.create_engine_config`` is the one point that ``LLM(...)``, ``vllm serve`` and ``AsyncLLM`` all pass
    through before any weights load. vLLM's ``SpeculativeConfig`` forbids unknown keys, so the plugin's section
    moves to ``additional_config`` (which reaches every worker). vLLM's ``--spec-method/--spec-model/--spec-tokens``
    are folded in first (``EngineArgs.create_speculative_config`` would fold them only after this point), so every
    way of asking for MTP resolves the same. Which model runner runs (``VllmConfig.use_v2_model_runner``) is known
    only once the config exists, so the runner-specific checks and settings come after vLLM's own.
    """
    from vllm.config import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    allowed = {f.name for f in dataclasses.fields(SpeculativeConfig)}

    def create_engine_config(self, *args: Any, **kwargs: Any):
        plugin_config = None
        flags = {"method": self.spec_method, "model": self.spec_model, "num_speculative_tokens": self.spec_tokens}
        if any(v is not None for v in flags.values()):
            spec = load_speculative_config(self.speculative_config or {})
            for key, value in flags.items():
                if value is not None and key in spec:
                    raise MTPConfigError(f"--spec-{key.split('_')[-1]} and --speculative-config['{key}'] are "
                                         f"mutually exclusive")
            self.speculative_config = {**spec, **{k: v for k, v in flags.items() if v is not None}}
            self.spec_method = self.spec_model = self.spec_tokens = None
        if self.speculative_config is not None:
            spec = load_speculative_config(self.speculative_config)
            self.speculative_config, plugin_config = resolve(spec, self.model, allowed)
            if plugin_config is not None:
                check_draft_parallelism(self.speculative_config, self.tensor_parallel_size)
                if (self.tensor_parallel_size > 1 and not self.speculative_config.get("enable_adaptive_verification")
                        and self.speculative_config.get("draft_sample_method") != "probabilistic"):
                    # Greedy drafts from the vocab-parallel head by a local argmax (the assistant's get_top_tokens).
                    self.speculative_config.setdefault("use_local_argmax_reduction", True)
                self.additional_config = {**(self.additional_config or {}), SECTION: plugin_config.to_dict()}
        config = original(self, *args, **kwargs)
        if plugin_config is not None:
            _fit_to_runner(config, plugin_config, explicit_async=self.async_scheduling)
        return config

    EngineArgs.create_engine_config = create_engine_config


def _fit_to_runner(config: Any, plugin_config: PluginConfig, explicit_async: bool | None) -> None:
    """What the plugin does on the engine's runner, set and logged before any weights load.

    - V1: the fused step reads the device once per step itself, so async scheduling (which would overlap a second,
      speculative copy of the same outputs) is turned off; asked for explicitly, it is an error. Pipeline
      parallelism is refused.
    - V2: V2's own step and scheduling stay; relaxed acceptance is added as a V2 logits processor.
    """
    from vllm_mtp_gemma4.worker.v2 import RELAXED_PROCESSOR

    runner = "V2" if config.use_v2_model_runner else "V1"
    resolved = plugin_config.for_runner(runner, config.speculative_config.rejection_sample_method)
    stages = config.parallel_config.pipeline_parallel_size
    if runner == "V1" and stages > 1:
        # The first stage has no drafter, and the plugin's V1 runner and proposer were built for the drafting stage.
        raise MTPConfigError(
            f"--pipeline-parallel-size {stages}: the plugin on Model Runner V1 runs without pipeline parallelism; "
            f"use --tensor-parallel-size across the ranks instead")
    if runner == "V1" and resolved.fused:
        if explicit_async:
            raise MTPConfigError(
                "--async-scheduling: the plugin's fused step on Model Runner V1 runs without async scheduling; drop "
                f"the flag, or set {SECTION}.fused to false")
        config.scheduler_config.async_scheduling = False
    if runner == "V2":
        model_config = config.model_config
        model_config.logits_processors = [*(model_config.logits_processors or []), RELAXED_PROCESSOR]
    config.additional_config[SECTION] = resolved.to_dict()
    spec = config.speculative_config
    features = {
        "fused step": "on" if resolved.fused else ("off (V2's own step)" if runner == "V2" else "off"),
        "relaxed acceptance": ("on by default" if resolved.relaxed_acceptance else "per request")
        + (" (V2 logits processor)" if runner == "V2" else "" if resolved.fused else ": unavailable"),
        "adaptive K": "on" if resolved.adaptive_k else "off",
        "draft argmax": "vocab-parallel local" if spec.use_local_argmax_reduction else "over full logits",
        "async scheduling": "on" if config.scheduler_config.async_scheduling else "off",
    }
    get_logger(__name__).info("vllm-mtp-gemma4: Model Runner %s, K=%d, assistant %s; %s", runner,
                              spec.num_speculative_tokens, spec.model,
                              "; ".join(f"{k}: {v}" for k, v in features.items()))
    PHASE_ACCEPTANCE.enabled = True


def _use_plugin_proposer() -> None:
    """Draft with the plugin's Gemma 4 MTP proposer wherever vLLM would use its own.

    ``GPUModelRunner.__init__`` (which ``CPUModelRunner`` inherits) builds ``Gemma4Proposer`` by its
    module-level name when ``speculative_config.use_gemma4_mtp()``. Ours subclasses it, so the
    runner's ``isinstance`` checks (block tables per KV group, hidden states) still hold.
    """
    from vllm.v1.worker import gpu_model_runner

    from vllm_mtp_gemma4.worker.v1.proposer import Gemma4MTPProposer

    gpu_model_runner.Gemma4Proposer = Gemma4MTPProposer


def _use_fused_runner() -> None:
    """The fused target-verify step on Model Runner V1, for the plugin's own engines only.

    ``CPUWorker.init_device`` builds ``CPUModelRunner`` by its module-level name in ``cpu_worker``, which becomes a
    factory; ``Worker._make_model_runner`` builds the V1 ``GPUModelRunner`` by a local import, so it is wrapped.
    An engine without the plugin's config gets vLLM's own runner class, untouched.
    """
    from vllm.v1.worker import cpu_worker, gpu_worker
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from vllm_mtp_gemma4.worker.v1.runner import FusedCPUModelRunner, FusedGPUModelRunner

    def is_ours(vllm_config) -> bool:
        return PluginConfig.from_additional_config(vllm_config.additional_config) is not None

    def cpu_model_runner(vllm_config, device, *args: Any, **kwargs: Any):
        runner = FusedCPUModelRunner if is_ours(vllm_config) else CPUModelRunner
        return runner(vllm_config, device, *args, **kwargs)

    cpu_worker.CPUModelRunner = cpu_model_runner
    original = gpu_worker.Worker._make_model_runner

    def _make_model_runner(self):
        if self.use_v2_model_runner or type(self) is not gpu_worker.Worker or not is_ours(self.vllm_config):
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
    - ``ray_executor_v2.initialize_ray_cluster`` first joins the cluster there is (``RAY_ADDRESS``, else one
      ``ray start`` left here; a refusal is one error naming its cause, auth included) or, only with none to
      join, starts a local one with one ``vllm_cpu`` per core that leaves no token in ``~/.ray``
      (``worker/ray_cpu.py`` says why). It then fails at once, naming the resource, when the cluster has fewer
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

    from vllm_mtp_gemma4.worker import ray_cpu
    from vllm_mtp_gemma4.worker.ray_cpu import RAY_CPU_RESOURCE, CPURayWorkerProc

    CpuPlatform.ray_device_key = RAY_CPU_RESOURCE
    ray_executor_v2.RayWorkerProc = CPURayWorkerProc
    original = ray_executor_v2.initialize_ray_cluster

    def initialize_ray_cluster(parallel_config, ray_address: str | None = None, **kwargs: Any):
        import ray

        if not ray.is_initialized():
            cluster = ray_cpu.cluster_to_join(ray_address)
            if cluster is None:  # no cluster to join: a local one, one rank per core at most
                ray_cpu.start_local_ray(parallel_config.ray_runtime_env, len(os.sched_getaffinity(0)))
            else:
                ray_cpu.join_ray(ray_address, cluster, parallel_config.ray_runtime_env)
        free = ray.available_resources().get(RAY_CPU_RESOURCE, 0)
        if parallel_config.world_size > free and parallel_config.placement_group is None:
            raise ValueError(
                f"Ray cluster has {free:g} free '{RAY_CPU_RESOURCE}' of the {parallel_config.world_size} that "
                f"tensor_parallel_size x pipeline_parallel_size needs: start each CPU node with "
                f"`ray start --resources '{{\"{RAY_CPU_RESOURCE}\": N}}'` (N ranks it may host), or use fewer ranks")
        return original(parallel_config, ray_address, **kwargs)

    ray_executor_v2.initialize_ray_cluster = initialize_ray_cluster
    _shm_groups_per_node()


def _shm_groups_per_node() -> None:
    """Keep vLLM's shared-memory collectives to ranks on one node (CPU, Ray).

    vLLM 0.32's CPU communicator (``cpu_communicator._CPUSHMDistributed``) uses shared memory for a TP/PP group
    whenever its ranks agree on the group's name, and the name (``VLLM_DIST_IDENT``, the init port) is the same on
    every node, so a group spanning nodes would wait on segments that exist only on the other node. With the Ray
    node in the name, such a group falls back to torch.distributed (gloo, over the network), as vLLM does for names
    that differ; a group within one node keeps shared memory.
    """
    import ray
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    original = _CPUSHMDistributed.make_group_name

    def make_group_name(communicator: Any) -> str:
        name = original(communicator)
        if ray.is_initialized():  # a Ray rank
            name += "-" + ray.get_runtime_context().get_node_id()[:12]
        return name

    _CPUSHMDistributed.make_group_name = staticmethod(make_group_name)


_FUSED_ADMISSION: contextvars.ContextVar[bool] = contextvars.ContextVar("mtp_gemma4_fused_admission", default=False)


def _validate_requests() -> None:
    """Per-request plugin options (``extra_args`` / ``vllm_xargs``) are checked at admission: a 400, not a crash.

    So, for the fused step, which applies ``logit_bias`` itself, are its token ids (vLLM 0.32 leaves them open).

    ``InputProcessor._validate_params`` runs in the front end for ``LLM`` and the OpenAI server alike; its
    ``VLLMValidationError`` becomes an HTTP 400 naming the parameter. The fused step applies ``min_p`` and
    ``logit_bias`` at every drafted position, so vLLM's refusal of them under speculation is lifted there.
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    spec_decode_check = SamplingParams._validate_spec_decode

    def _validate_spec_decode(self, *args: Any, **kwargs: Any):
        # Skipped only inside the fused engines' own admission (a context variable: per thread and per task, so two
        # engines in one process and concurrent requests each see their own).
        if not _FUSED_ADMISSION.get():
            return spec_decode_check(self, *args, **kwargs)

    SamplingParams._validate_spec_decode = _validate_spec_decode

    def _validate_params(self, params, supported_tasks):
        config = PluginConfig.from_additional_config(self.vllm_config.additional_config)
        if config is None or not isinstance(params, SamplingParams):
            return original(self, params, supported_tasks)
        try:
            check_request_options(params.extra_args, bool(config.fused) or self.vllm_config.use_v2_model_runner)
            check_draft_cap(params.extra_args, None if config.fused else
                            "not available on Model Runner V2" if self.vllm_config.use_v2_model_runner else
                            "this server runs Model Runner V1 without the fused step (fused: false)")
            if config.fused:
                check_logit_bias(params.logit_bias, self.model_config.get_vocab_size())
        except MTPConfigError as e:
            field = str(e).split(":", 1)[0]
            raise VLLMValidationError(str(e), parameter=field, value=None) from None
        if not config.fused:
            return original(self, params, supported_tasks)
        token = _FUSED_ADMISSION.set(True)
        try:
            return original(self, params, supported_tasks)
        finally:
            _FUSED_ADMISSION.reset(token)

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


def _report_drafters() -> None:
    """Once an engine of the plugin's has started, ask its workers what drafts (``worker/info.py``), for
    ``vllm:mtp_gemma4_proposer_info``.

    ``WorkerBase`` gets ``mtp_gemma4_drafter_info``: a method name that ``collective_rpc`` calls without pickling a
    function. ``LLMEngine`` (``LLM``) asks at the end of its ``__init__``; ``AsyncLLM`` (``vllm serve``) from a task
    on the event loop it is built in.
    """
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.worker_base import WorkerBase

    from vllm_mtp_gemma4.worker.info import drafter_info

    WorkerBase.mtp_gemma4_drafter_info = drafter_info
    sync_init, async_init = LLMEngine.__init__, AsyncLLM.__init__

    def llm_engine_init(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        sync_init(self, vllm_config, *args, **kwargs)
        if SECTION in (vllm_config.additional_config or {}):
            record_drafters(self.collective_rpc("mtp_gemma4_drafter_info"))

    def async_llm_init(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        async_init(self, vllm_config, *args, **kwargs)
        if SECTION in (vllm_config.additional_config or {}):
            async def report() -> None:
                record_drafters(await self.collective_rpc("mtp_gemma4_drafter_info"))

            self._mtp_gemma4_report = asyncio.get_running_loop().create_task(report())

    LLMEngine.__init__ = llm_engine_init
    AsyncLLM.__init__ = async_llm_init


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
    _report_drafters()
    _one_line_config_errors()
