"""Every change the plugin makes to vLLM internals, in one place. Checked against vLLM 0.32.0 and 0.33.0.

Each patch is applied once per process by ``apply()`` (called from ``plugin.register``) and says
why it exists and which vLLM versions it was read against. Bumping vLLM means re-reading each of these
against the new sources; ``tools/check_vllm_api.py`` finds the names and signatures that changed.
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
    check_pair,
    check_request_options,
    check_target,
    load_speculative_config,
    take_section,
    thinking_marker_ids,
    vllm_refusal,
)
from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.metrics import PHASE_ACCEPTANCE, PhaseTracker, record_drafters

_applied = False


def _accept_config_file_in_cli() -> None:
    """``--speculative-config`` takes a JSON file path as well as inline JSON.

    vLLM 0.32 parses the flag with ``json.loads`` (``EngineArgs.add_cli_args``), so a path fails in
    argparse. We keep the raw string; ``_resolve_speculative_config`` loads it, with errors that name
    the file, line and column. General plugins load before ``EngineArgs.add_cli_args`` runs
    (``AsyncEngineArgs.add_cli_args`` calls ``load_general_plugins`` first).

    Checked against vLLM 0.32.0 and 0.33.0 (both parse ``--speculative-config`` with ``optional_type(json.loads)``).
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


@dataclasses.dataclass
class _Resolution:
    """One ``create_engine_config`` call's plugin section (held aside from vLLM) and, once vLLM has resolved the
    speculative config, the plugin's config if the engine is the plugin's."""

    section: PluginConfig | None
    plugin_config: PluginConfig | None = None


_RESOLUTION: contextvars.ContextVar[_Resolution | None] = contextvars.ContextVar("mtp_gemma4_resolution",
                                                                                default=None)


def _resolve_speculative_config() -> None:
    """Load the speculative config, hold the plugin's section aside while vLLM builds its configs, then decide from
    vLLM's own resolved configs whether the engine is the plugin's, and fit it to the runner.

    ``EngineArgs.create_engine_config`` is the one point that ``LLM(...)``, ``vllm serve`` and ``AsyncLLM`` all pass
    through before any weights load. vLLM's ``SpeculativeConfig`` forbids unknown keys, so the section is taken out
    first; a spec that carries it is checked at once (one-line errors). ``EngineArgs.create_speculative_config``
    receives the target's ``ModelConfig`` as vLLM resolved it (revision, ``trust_remote_code``, ``hf_overrides``,
    GGUF, remote URIs, ``--spec-*`` flags folded in) and builds the draft's: the plugin reads both there and never
    reads a checkpoint's files itself. An engine that is not a Gemma 4 target with a Gemma 4 assistant gets exactly
    vLLM's configs and errors. The plugin's own engines get their section in ``additional_config`` (which reaches
    every worker); the ``EngineArgs`` are left as given, so a second call resolves the same. Which model runner
    runs (``VllmConfig.use_v2_model_runner``) is known only once the config exists, so the runner-specific checks
    and settings come last.

    Checked against vLLM 0.32.0 and 0.33.0 (``create_engine_config`` calls ``create_speculative_config`` once, with
    the target's ``ModelConfig`` and ``ParallelConfig``, before ``VllmConfig`` reads ``additional_config``).
    """
    from vllm.config import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    original_speculative = EngineArgs.create_speculative_config
    allowed = {f.name for f in dataclasses.fields(SpeculativeConfig)}

    def create_engine_config(self, *args: Any, **kwargs: Any):
        given = self.speculative_config, self.additional_config
        section = None
        if self.speculative_config is not None:
            self.speculative_config, section = take_section(load_speculative_config(self.speculative_config),
                                                            allowed)
        resolution = _Resolution(section)
        token = _RESOLUTION.set(resolution)
        try:
            config = original(self, *args, **kwargs)
        finally:
            _RESOLUTION.reset(token)
            if resolution.plugin_config is not None or section is not None:
                self.speculative_config, self.additional_config = given
        if resolution.plugin_config is not None:
            _fit_to_runner(config, resolution.plugin_config, explicit_async=self.async_scheduling)
        return config

    def create_speculative_config(self, target_model_config, target_parallel_config):
        resolution = _RESOLUTION.get()
        if resolution is None:  # called outside create_engine_config
            return original_speculative(self, target_model_config, target_parallel_config)
        section = resolution.section
        target_text = target_model_config.hf_text_config
        if section is not None:
            check_target(target_model_config.model, getattr(target_text, "model_type", None))
        try:
            spec_config = original_speculative(self, target_model_config, target_parallel_config)
        except MTPConfigError:
            raise
        except Exception as e:
            if section is None:
                raise
            raise vllm_refusal(e, self.speculative_config) from e
        if spec_config is None:
            return None
        draft = spec_config.draft_model_config
        draft_hf = getattr(draft, "hf_config", None)
        if not check_pair(target=target_model_config.model, target_type=getattr(target_text, "model_type", None),
                          target_hidden=getattr(target_text, "hidden_size", None), method=spec_config.method,
                          draft=spec_config.model, draft_type=getattr(draft_hf, "model_type", None),
                          draft_is_assistant=spec_config.use_gemma4_mtp(),
                          backbone_hidden=getattr(draft_hf, "backbone_hidden_size", None),
                          has_section=section is not None):
            return spec_config
        if target_model_config.skip_tokenizer_init:
            # The runners read the thinking markers and EOS ids from the tokenizer (worker/v1/runner.py, v2/relaxed.py).
            raise MTPConfigError("skip_tokenizer_init: the plugin reads Gemma 4's thinking markers from the "
                                 "tokenizer; leave it off (--skip-tokenizer-init), or serve without the MTP config")
        spec = self.speculative_config  # vLLM's dict, --spec-* flags folded in
        tensor_parallel_size = target_parallel_config.tensor_parallel_size
        check_draft_parallelism(spec, tensor_parallel_size)
        changes = {}
        if os.path.isdir(spec_config.model) and not os.path.isabs(spec_config.model):
            # A local draft as vLLM found it; absolute, so every rank on any node and in any directory loads it.
            changes["model"] = os.path.abspath(spec_config.model)
        if (tensor_parallel_size > 1 and "use_local_argmax_reduction" not in spec and not spec.get(
                "enable_adaptive_verification") and spec.get("draft_sample_method") != "probabilistic"):
            # Greedy drafts from the vocab-parallel head by a local argmax (the assistant's get_top_tokens).
            changes["use_local_argmax_reduction"] = True
        if changes:
            spec.update(changes)
            spec_config = SpeculativeConfig(**spec)  # as vLLM's create_speculative_config builds it
        plugin_config = section or PluginConfig()
        self.additional_config = {**(self.additional_config or {}), SECTION: plugin_config.to_dict()}
        resolution.plugin_config = plugin_config
        return spec_config

    EngineArgs.create_engine_config = create_engine_config
    EngineArgs.create_speculative_config = create_speculative_config


def _fit_to_runner(config: Any, plugin_config: PluginConfig, explicit_async: bool | None) -> None:
    """What the plugin does on the engine's runner, set and logged before any weights load.

    - V1: the fused step reads the device once per step itself, so async scheduling (which would overlap a second,
      speculative copy of the same outputs) is turned off; asked for explicitly, it is an error. Pipeline
      parallelism is refused.
    - V2: V2's own step and scheduling stay; the plugin's parts are added by ``worker.v2.fit_to_v2``.

    Checked against vLLM 0.32.0 and 0.33.0 (``VllmConfig.use_v2_model_runner``; ``ModelConfig.logits_processors``
    is read by V2's runner after this point).
    """
    from vllm_mtp_gemma4.worker.v2 import fit_to_v2

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
    v2_parts = fit_to_v2(config, resolved) if runner == "V2" else {}
    config.additional_config[SECTION] = resolved.to_dict()
    spec = config.speculative_config
    features = {
        "fused step": "on" if resolved.fused else ("off (V2's own step)" if runner == "V2" else "off"),
        "relaxed acceptance": v2_parts.get("relaxed acceptance", ("on by default" if resolved.relaxed_acceptance
                                                                   else "per request")
                                           + ("" if resolved.fused else ": unavailable")),
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

    Checked against vLLM 0.32.0 and 0.33.0 (``v1/spec_decode/gemma4.py`` is the same file in both).
    """
    from vllm.v1.worker import gpu_model_runner

    from vllm_mtp_gemma4.worker.v1.proposer import Gemma4MTPProposer

    gpu_model_runner.Gemma4Proposer = Gemma4MTPProposer


def _use_fused_runner() -> None:
    """The fused target-verify step on Model Runner V1, for the plugin's own engines only.

    ``CPUWorker.init_device`` builds ``CPUModelRunner`` by its module-level name in ``cpu_worker``, which becomes a
    factory; ``Worker._make_model_runner`` builds the V1 ``GPUModelRunner`` by a local import, so it is wrapped.
    An engine without the plugin's config gets vLLM's own runner class, untouched.

    Checked against vLLM 0.32.0 and 0.33.0.
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
    ``RayExecutorV2`` is vLLM's Ray executor (0.33 removed the legacy one; 0.32's, behind
    ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``, is not covered).

    Checked against vLLM 0.32.0 and 0.33.0 (0.33's ``initialize_ray_cluster`` has no ``require_gpu_on_driver``;
    the wrapper passes whatever keywords it gets).
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

    Checked against vLLM 0.32.0 and 0.33.0.
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

    ``logit_bias`` token ids outside the vocabulary are vLLM's own check (``SamplingParams.verify``), which runs
    for the fused step too.

    ``InputProcessor._validate_params`` runs in the front end for ``LLM`` and the OpenAI server alike; its
    ``VLLMValidationError`` becomes an HTTP 400 naming the parameter. The fused step applies ``min_p`` and
    ``logit_bias`` at every drafted position, so vLLM's refusal of them under speculation is lifted there.

    Checked against vLLM 0.32.0 and 0.33.0.
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_mtp_gemma4.worker.v2 import relaxed_unavailable

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
            v1_unavailable = "this server runs Model Runner V1 without the fused step (fused: false)"
            check_request_options(params.extra_args, relaxed_unavailable(self.vllm_config) if
                                  self.vllm_config.use_v2_model_runner else None if config.fused else v1_unavailable)
            check_draft_cap(params.extra_args, None if config.fused else
                            "not available on Model Runner V2" if self.vllm_config.use_v2_model_runner else
                            "this server runs Model Runner V1 without the fused step (fused: false)")
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


_ENGINE_INDEX: contextvars.ContextVar[int] = contextvars.ContextVar("mtp_gemma4_engine_index", default=0)


def _count_acceptance_by_phase() -> None:
    """Feed ``PHASE_ACCEPTANCE`` from the front end's per-step outputs (``OutputProcessor.process_outputs``).

    The front end is where ``/metrics`` and ``LLM.get_metrics()`` read from, and it sees each request's tokens
    step by step, which is all the thinking/answer split needs. Each plugin engine's ``OutputProcessor`` holds a
    ``PhaseTracker`` (``_watch_plugin_engines``); an abort (``OutputProcessor.abort_requests``: a cut stream, a
    client gone) drops the requests it no longer holds. The engine label is the index of the engine whose
    outputs are being processed: the engine-core clients' ``get_output``/``get_output_async`` return them (with
    ``EngineCoreOutputs.engine_index``) just before, in the same thread or task, as vLLM's stat loggers read it.

    Checked against vLLM 0.32.0 and 0.33.0.
    """
    from vllm.v1.engine.core_client import AsyncMPClient, InprocClient, SyncMPClient
    from vllm.v1.engine.output_processor import OutputProcessor

    def labelled(get_output: Any) -> Any:
        def get_output_labelled(self, *args: Any, **kwargs: Any):
            outputs = get_output(self, *args, **kwargs)
            _ENGINE_INDEX.set(outputs.engine_index)
            return outputs

        return get_output_labelled

    InprocClient.get_output = labelled(InprocClient.get_output)
    SyncMPClient.get_output = labelled(SyncMPClient.get_output)
    get_output_async = AsyncMPClient.get_output_async

    async def get_output_async_labelled(self, *args: Any, **kwargs: Any):
        outputs = await get_output_async(self, *args, **kwargs)
        _ENGINE_INDEX.set(outputs.engine_index)  # in the awaiting task's context: its process_outputs comes next
        return outputs

    AsyncMPClient.get_output_async = get_output_async_labelled
    process_outputs, abort_requests = OutputProcessor.process_outputs, OutputProcessor.abort_requests

    def process_outputs_by_phase(self, engine_core_outputs, *args: Any, **kwargs: Any):
        tracker = getattr(self, "_mtp_gemma4_phases", None)
        if tracker is not None and self.tokenizer is not None:
            if not hasattr(self, "_mtp_thinking_markers"):
                self._mtp_thinking_markers = thinking_marker_ids(self.tokenizer)
            markers = self._mtp_thinking_markers
            if None not in markers:
                engine = _ENGINE_INDEX.get()
                for output in engine_core_outputs:
                    state = self.request_states.get(output.request_id)
                    if state is not None:  # else aborted here already: vLLM drops the output too
                        tracker.observe(output.request_id, state.prompt_token_ids, output.new_token_ids,
                                        output.finished, markers, engine)
        return process_outputs(self, engine_core_outputs, *args, **kwargs)

    def abort_requests_releasing(self, *args: Any, **kwargs: Any):
        aborted = abort_requests(self, *args, **kwargs)
        tracker = getattr(self, "_mtp_gemma4_phases", None)
        if tracker is not None:
            tracker.release(self.request_states)
        return aborted

    OutputProcessor.process_outputs = process_outputs_by_phase
    OutputProcessor.abort_requests = abort_requests_releasing


def _watch_plugin_engines() -> None:
    """The front end of each engine of the plugin's: a ``PhaseTracker`` on its ``OutputProcessor``, and once it has
    started, its workers asked what drafts (``worker/info.py``), for ``vllm:mtp_gemma4_proposer_info``.

    ``WorkerBase`` gets ``mtp_gemma4_drafter_info``: a method name that ``collective_rpc`` calls without pickling a
    function. ``LLMEngine`` (``LLM``) asks at the end of its ``__init__``. ``AsyncLLM`` (``vllm serve``) asks from a
    task on the event loop that serves it: vLLM starts its output handler (``AsyncLLM._run_output_handler``) in
    ``__init__`` when a loop runs there, else with the first request (an ``AsyncLLM`` built from sync code, as in a
    Ray Serve replica's constructor), and the question goes with it.

    Checked against vLLM 0.32.0 and 0.33.0.
    """
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.worker_base import WorkerBase

    from vllm_mtp_gemma4.worker.info import drafter_info

    WorkerBase.mtp_gemma4_drafter_info = drafter_info
    sync_init, async_init, run_output_handler = LLMEngine.__init__, AsyncLLM.__init__, AsyncLLM._run_output_handler

    def track_phases(engine: Any, vllm_config: Any) -> None:
        engines = getattr(engine.engine_core, "engine_ranks_managed", None) or [0]
        engine.output_processor._mtp_gemma4_phases = PhaseTracker(vllm_config.model_config.served_model_name,
                                                                  list(engines))

    def llm_engine_init(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        sync_init(self, vllm_config, *args, **kwargs)
        if SECTION in (vllm_config.additional_config or {}):
            track_phases(self, vllm_config)
            record_drafters(self.collective_rpc("mtp_gemma4_drafter_info"))

    def async_llm_init(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        ours = SECTION in (vllm_config.additional_config or {})
        self._mtp_gemma4_report_due = ours
        async_init(self, vllm_config, *args, **kwargs)
        if ours:
            track_phases(self, vllm_config)

    def _run_output_handler(self) -> None:
        run_output_handler(self)
        if getattr(self, "_mtp_gemma4_report_due", False):  # on the loop that serves the engine
            self._mtp_gemma4_report_due = False

            async def report() -> None:
                record_drafters(await self.collective_rpc("mtp_gemma4_drafter_info"))

            self._mtp_gemma4_report = asyncio.get_running_loop().create_task(report())

    LLMEngine.__init__ = llm_engine_init
    AsyncLLM.__init__ = async_llm_init
    AsyncLLM._run_output_handler = _run_output_handler


def _one_line_config_errors() -> None:
    """An ``MTPConfigError`` that reaches the top of ``vllm serve`` prints one line, not a traceback.

    The error is raised in the API server process before any weights load; exit status stays 1. No vLLM name.
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
    _watch_plugin_engines()
    _one_line_config_errors()
