"""The fused target-verify model runner.

One speculative step, composed in ``sample_tokens`` top to bottom:

1. merge: the scheduler already placed each row's drafts after its new token (vLLM's layout, known on the host);
2. target forward: ``execute_model`` (vLLM's, unchanged);
3. verify: ``StepVerifier`` over the plugin's ops, for every row (drafted or not);
4. shift and 5. K draft steps: the proposer, from the device-side verification result. With adaptive K the cost
   model (``ops/cost.py``) plans the step first, from each request's acceptance rates and the step times the
   engine measured at this batch size: S draft steps (0: none, and the next step is a plain one) and each
   request's count, which the assistant's confidence then refines on the device (``ops/adaptive.py``);
6. one host read of ``[sampled ids | next drafts (| draft counts, beliefs)]``, from which bookkeeping and the
   next step's drafts are built.

Only the plugin's own engines (with its config) get this runner (``patches._use_fused_runner``). With
``"fused": false`` or without the plugin's proposer, every method defers to vLLM's runner (the unfused path), but
for one repair: a seeded request whose sample is discarded (a partial prefill) keeps its CPU generator, which
vLLM 0.32 would rewind with ``set_offset`` and crash. Checked against vLLM 0.32.0 (``GPUModelRunner.sample_tokens``,
non-async scheduling; the fused path turns async scheduling off).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.distributed import get_tp_group
from vllm.tokenizers import cached_tokenizer_from_config
from vllm.v1.outputs import ModelRunnerOutput, SamplerOutput
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.spec_decode.utils import unconditional_to_conditional_rates
from vllm.v1.structured_output.utils import apply_grammar_bitmask
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_mtp_gemma4.config import PluginConfig, thinking_marker_ids
from vllm_mtp_gemma4.log import get_logger
from vllm_mtp_gemma4.ops import (
    DraftPlan,
    Planner,
    StepTimes,
    batch_bucket,
    choose_num_drafts,
    draft_chances,
    draft_survival,
)
from vllm_mtp_gemma4.worker import STEP_PHASES
from vllm_mtp_gemma4.worker.v1.host_reads import HostReadCounter, counting_enabled, device_tensors
from vllm_mtp_gemma4.worker.v1.proposer import Gemma4MTPProposer
from vllm_mtp_gemma4.worker.v1.requests import RequestTracker, RowInputs
from vllm_mtp_gemma4.worker.v1.verifier import StepVerifier

logger = get_logger(__name__)

# Adaptive K: the step times in use are refreshed every REFRESH_STEPS steps (and at once on one rank while the
# batch's bucket still measures its own ends); under tensor parallelism every rank then takes rank 0's, so all ranks
# plan alike (``ops.Planner`` is deterministic in its inputs).
REFRESH_STEPS = 16


class FusedStepMixin:
    """Replaces the sampling half of vLLM's runner with the fused step when the plugin's proposer drafts."""

    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        config = PluginConfig.from_additional_config(vllm_config.additional_config)
        self.fused = config is not None and config.fused and isinstance(getattr(self, "drafter", None),
                                                                        Gemma4MTPProposer)
        self.fused_steps = 0
        self.host_reads: Counter[str] | None = Counter() if counting_enabled() else None
        self.phase_seconds = dict.fromkeys(STEP_PHASES, 0.0)
        if not self.fused:
            return
        self.plugin_config = config
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        open_id, close_id = thinking_marker_ids(tokenizer)
        self.tracker = RequestTracker(config, open_id, close_id, self.num_spec_tokens, device)
        spec = vllm_config.speculative_config
        synthetic = None
        if spec.rejection_sample_method == "synthetic":
            synthetic = unconditional_to_conditional_rates(spec.synthetic_acceptance_rates)
            logger.warning("vllm-mtp-gemma4: rejection_sample_method 'synthetic': each draft is accepted at the "
                           "configured rate (per position %s), whatever it is; the output is NOT lossless (for "
                           "benchmarks only)", spec.synthetic_acceptance_rates)
        self.verifier = StepVerifier(self.sampler, self.tracker, synthetic)
        self._rows: RowInputs | None = None  # the running step's
        self.step_times = StepTimes(self.num_spec_tokens)
        self.times_in_use = self.step_times.estimated()
        self.planner = Planner(self.num_spec_tokens)
        self.plans = 0
        self.plain_steps = 0  # steps whose plan drafted nothing
        self._last_steps: int | None = None  # S of the previous plan
        self._step_started: float | None = None
        self._decode_rows: int | None = None  # rows of the running step, if it is pure decode
        # (sampled, B, S) of the running step, if pure decode and steady
        self._timed_step: tuple[bool, int, int] | None = None
        logger.info("vllm-mtp-gemma4: fused target-verify step on (thinking markers %s/%s)", open_id, close_id)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        # Wall time is the device time on CPU; on CUDA these would need events (not wired up yet).
        begin = time.perf_counter()
        yield
        self.phase_seconds[name] += time.perf_counter() - begin

    def execute_model(self, scheduler_output, *args: Any, **kwargs: Any):
        if not self.fused:
            return super().execute_model(scheduler_output, *args, **kwargs)
        if self.plugin_config.adaptive_k:
            self._time_step(scheduler_output)
        with self._phase("target"):
            return super().execute_model(scheduler_output, *args, **kwargs)

    def _time_step(self, scheduler_output) -> None:
        """One measurement for the cost table: the previous step's (B, S) and the seconds from its start to this
        one's (everything the engine did for it). Only steady pure-decode steps count, and not across new arrivals
        (idle time)."""
        now = time.perf_counter()
        if self._timed_step is not None and not scheduler_output.scheduled_new_reqs:
            self.step_times.observe(*self._timed_step, now - self._step_started)
        self._step_started, self._timed_step = now, None
        rows = len(scheduler_output.num_scheduled_tokens)
        drafts = sum(len(d) for d in scheduler_output.scheduled_spec_decode_tokens.values())
        self._decode_rows = rows if rows and scheduler_output.total_num_scheduled_tokens == rows + drafts else None

    def _plan(self, req_ids: list[str]) -> DraftPlan:
        """This step's draft steps and each request's draft count (``ops/cost.py``)."""
        k = self.num_spec_tokens
        sampled = not self.input_batch.sampling_metadata.all_greedy
        if self.fused_steps % REFRESH_STEPS == 0 or (
                get_tp_group().world_size == 1
                and self.times_in_use[int(sampled), batch_bucket(len(req_ids)), : k + 1].isnan().any()):
            self._refresh_times()
        self.plans += 1
        plan = self.planner.plan(sampled, self.tracker.survival(req_ids), self.times_in_use[int(sampled)])
        if self._decode_rows is not None and self._last_steps == plan.steps:
            self._timed_step = (sampled, self._decode_rows, plan.steps)
        self._last_steps = plan.steps
        self.plain_steps += plan.steps == 0
        return plan

    def _refresh_times(self) -> None:
        times = self.step_times.estimated()
        group = get_tp_group()
        if group.world_size > 1:  # every rank plans with rank 0's times: the plans, and so the collectives, agree
            times = group.broadcast(times.to(self.device), src=0).cpu()
        self.times_in_use = times

    def _update_states(self, scheduler_output):
        result = super()._update_states(scheduler_output)
        if self.fused:
            self.tracker.forget(scheduler_output.finished_req_ids)
            for new in scheduler_output.scheduled_new_reqs:
                self.tracker.admit(new.req_id, new.sampling_params, new.prompt_token_ids)
            # Noise is counter-based; vLLM's per-request generators would only be rewound on partial prefills,
            # which CPU generators cannot do ("CPU Generator does not use offset").
            self.input_batch.generators.clear()
        return result

    def _sample(self, logits: Tensor | None, spec_decode_metadata: SpecDecodeMetadata | None) -> SamplerOutput:
        if not self.fused:
            with self._keep_discarded_generators():
                return super()._sample(logits, spec_decode_metadata)
        batch = self.input_batch
        num_rows = batch.num_reqs
        self._rows = rows = self.tracker.rows(batch.req_ids[:num_rows])
        if rows.vllm_samples and (spec_decode_metadata is None or not any(spec_decode_metadata.num_draft_tokens)):
            # Nothing to verify and no row needing the plugin's draws: vLLM's own sampler, as in a plain step
            # (the verifier's ops cost a plain step on the fixture about a fifth more).
            sampler_output = self.sampler(logits, batch.sampling_metadata)
        else:
            sampler_output, _ = self.verifier.verify(
                logits, spec_decode_metadata, batch.sampling_metadata, rows, batch.spec_token_ids[:num_rows],
                batch.num_tokens_no_spec[:num_rows].astype(np.int64),
            )
        if rows.any_relaxed:  # the thinking state, advanced on the device by what this step commits
            discarded = torch.from_numpy(self.discard_request_mask.np[:num_rows]).to(self.device, non_blocking=True)
            self.tracker.advance(rows, sampler_output.sampled_token_ids, discarded)
        return sampler_output

    @contextmanager
    def _keep_discarded_generators(self) -> Iterator[None]:
        """vLLM's own step on CPU: a seeded request whose sample is discarded (a partial prefill) gets its generator
        back as it was, and vLLM's rewind of it is skipped.

        vLLM 0.32 rewinds with ``set_offset``, which CPU generators lack ("CPU Generator does not use offset"), so a
        seeded request in chunked prefill kills the engine, with or without speculation. Saving and restoring the
        generator's state is the same rewind, exactly.
        """
        if self.device.type != "cpu":
            yield
            return
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        generators = self.input_batch.generators
        saved = {int(i): generators[int(i)].get_state() for i in discarded if int(i) in generators}
        yield
        for i, state in saved.items():
            generators[i].set_state(state)
        self._skip_rewind = set(saved)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any):
        skip = getattr(self, "_skip_rewind", set())
        if not skip:
            return super()._bookkeeping_sync(*args, **kwargs)
        generators = self.input_batch.generators
        held = {i: generators.pop(i) for i in skip if i in generators}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            generators.update(held)
            self._skip_rewind = set()

    def sample_tokens(self, grammar_output):
        if not self.fused or self.execute_model_state is None:
            return super().sample_tokens(grammar_output)
        (scheduler_output, logits, spec_decode_metadata, spec_decode_common_attn_metadata, hidden_states,
         sample_hidden_states, aux_hidden_states, ec_connector_output, cudagraph_stats,
         slot_mappings) = self.execute_model_state
        self.execute_model_state = None
        if grammar_output is not None:
            apply_grammar_bitmask(scheduler_output, grammar_output, self.input_batch, logits)

        counter = nullcontext() if self.host_reads is None else HostReadCounter(device_tensors(
            logits, hidden_states, sample_hidden_states, aux_hidden_states, spec_decode_metadata,
            spec_decode_common_attn_metadata))
        with counter:
            sampled, sampler_output, next_drafts, chosen = self._verify_draft_read(
                scheduler_output, logits, spec_decode_metadata, spec_decode_common_attn_metadata, hidden_states,
                sample_hidden_states, aux_hidden_states, slot_mappings)
        if self.host_reads is not None:
            self.host_reads.update(counter.reads)
        req_ids = self.input_batch.req_ids
        with self._phase("host"):
            if chosen is not None:
                if spec_decode_metadata is not None:
                    self.tracker.observe_acceptance(req_ids, spec_decode_metadata.num_draft_tokens, sampled)
                counts, confidence = chosen
                if self._rows.draft_caps is not None:
                    counts = np.minimum(counts, self._rows.draft_caps)
                self.tracker.expect(req_ids, counts, confidence)
                next_drafts = [row[:n] for row, n in zip(next_drafts, counts.tolist())]
            elif self._rows.draft_caps is not None:  # per-request caps (``vllm_xargs``)
                next_drafts = [row[:cap] for row, cap in zip(next_drafts, self._rows.draft_caps)]
            self._draft_token_ids = next_drafts
            self._draft_token_req_ids = self.input_batch.req_ids.copy()
            (num_nans_in_logits, _, logprobs_lists, valid_sampled_token_ids, prompt_logprobs_dict,
             req_ids_output_copy, req_id_to_index_output_copy, _) = self._bookkeeping_sync(
                scheduler_output, SamplerOutput(sampled, sampler_output.logprobs_tensors), logits, hidden_states,
                scheduler_output.total_num_scheduled_tokens,
            )
        self.finalize_kv_connector()
        self.eplb_step()
        kv_connector_output, self.kv_connector_output = self.kv_connector_output, None
        return ModelRunnerOutput(
            req_ids=req_ids_output_copy,
            req_id_to_index=req_id_to_index_output_copy,
            sampled_token_ids=valid_sampled_token_ids,
            logprobs=logprobs_lists,
            prompt_logprobs_dict=prompt_logprobs_dict,
            kv_connector_output=kv_connector_output,
            ec_connector_output=ec_connector_output if self.supports_mm_inputs else None,
            num_nans_in_logits=num_nans_in_logits,
            cudagraph_stats=cudagraph_stats,
        )

    def _verify_draft_read(self, scheduler_output, logits, spec_decode_metadata, spec_decode_common_attn_metadata,
                           hidden_states, sample_hidden_states, aux_hidden_states, slot_mappings):
        """Verification, shift and K draft steps on the device, then the step's one host read."""
        with self._phase("verify"):
            sampler_output = self._sample(logits, spec_decode_metadata)
        self._update_states_after_model_execute(sampler_output.sampled_token_ids, scheduler_output)
        self._draft_probs = self._draft_prob_req_ids = None
        self.valid_sampled_token_count_gpu = None
        self.input_batch.prev_sampled_token_ids = None

        drafts = None  # shift + K draft steps, on the device, from the device-side verification
        adaptive = self.plugin_config.adaptive_k
        req_ids = self.input_batch.req_ids
        with self._phase("draft"):
            plan = self._plan(req_ids) if adaptive else None
            steps = self.num_spec_tokens if plan is None else plan.steps
            if self._rows.draft_caps is not None:  # no draft step beyond the largest per-request cap
                steps = min(steps, max(self._rows.draft_caps))
            if steps and self._input_fits_in_drafter(spec_decode_common_attn_metadata):
                if steps < self.num_spec_tokens or plan is not None:  # vLLM hands the proposer this many steps
                    scheduler_output.num_spec_tokens_to_schedule = steps
                begin = time.perf_counter()
                drafts = self.propose_draft_token_ids(
                    scheduler_output, sampler_output.sampled_token_ids, self.input_batch.sampling_metadata,
                    hidden_states, sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                    spec_decode_common_attn_metadata, slot_mappings,
                )
                if plan is not None:
                    self.step_times.observe_draft(not self.input_batch.sampling_metadata.all_greedy, len(req_ids),
                                                  (time.perf_counter() - begin) / steps)
            elif self.parallel_config.data_parallel_size > 1:
                # As vLLM's step does: a rank that skips drafting still joins the drafter's collectives, so DP
                # ranks that disagree on whether to draft do not hang.
                self.drafter.dummy_run(num_tokens=1)
            choice = self._choose_num_drafts(plan) if plan is not None and drafts is not None else None
        with self._phase("host"):
            sampled, next_drafts, chosen = self._read_step(sampler_output.sampled_token_ids, drafts, choice)
        if plan is not None and chosen is None:  # no confidence: the plan's counts (0 where nothing was drafted)
            chosen = (plan.counts if drafts is not None else np.zeros(len(req_ids), np.int64), None)
        return sampled, sampler_output, next_drafts, chosen

    def _choose_num_drafts(self, plan: DraftPlan) -> Tensor | None:
        """[B, 1 + steps]: drafts to verify per request, then the assistant's confidence ``c_l`` in each (what the
        calibration learns from), on the device; None for a head without confidence (centroids)."""
        confidence = self.drafter.last_confidence
        if confidence is None:
            return None
        calibration = torch.from_numpy(self.tracker.calibrations(self.input_batch.req_ids)).to(confidence.device)
        chances = draft_chances(confidence, calibration)
        counts = choose_num_drafts(draft_survival(chances), plan.tau)
        return torch.cat([counts[:, None].double(), confidence.double()], dim=1)

    def _read_step(
        self, sampled: Tensor, drafts: Tensor | None, choice: Tensor | None
    ) -> tuple[Tensor, list[list[int]], tuple[np.ndarray, np.ndarray] | None]:
        """The step's one device-to-host read: sampled ids [B, K+1], next drafts [B, steps] and, with adaptive K,
        the per-request draft counts and confidences, packed in one tensor (float64 when mixed: ids stay exact).

        Requested logprobs come on top (vLLM's ``LogprobsTensors.tolists``).
        """
        width = sampled.shape[1]
        if drafts is None:  # the drafter cannot take this batch: schedule zeros, as vLLM does
            drafts = sampled.new_zeros(sampled.shape[0], self.num_spec_tokens)
        parts = [sampled, drafts.to(sampled.dtype)]
        if choice is not None:
            parts = [p.double() for p in parts] + [choice]
        host = torch.cat(parts, dim=1).to("cpu")
        self.fused_steps += 1
        end = width + drafts.shape[1]
        chosen = None
        if choice is not None:
            chosen = (host[:, end].long().numpy(), host[:, end + 1:].numpy())
        return host[:, :width].to(sampled.dtype), host[:, width:end].long().tolist(), chosen


def fused_step_counters(worker: Any) -> dict[str, Any]:
    """Read through ``LLM.collective_rpc``: whether the fused step runs, its steps, host reads and phase times."""
    runner = worker.model_runner
    return {
        "runner": type(runner).__name__,
        "fused": bool(getattr(runner, "fused", False)),
        "steps": getattr(runner, "fused_steps", 0),
        # {kind: count} of the reads the fused steps made, with VLLM_MTP_GEMMA4_COUNT_HOST_READS=1; else None.
        "host_reads": dict(reads) if (reads := getattr(runner, "host_reads", None)) is not None else None,
        "phase_seconds": dict(getattr(runner, "phase_seconds", {})),
        "calibration": runner.tracker.calibration.ratio.tolist() if getattr(runner, "fused", False) else None,
        # Adaptive K: plans made, plans that drafted nothing, and the step seconds in use, per regime and batch-size
        # bucket (1, 2, 3-4, ... rows): by S = 0..K, then one draft step's (None: not measured).
        "plans": getattr(runner, "plans", 0),
        "plain_steps": getattr(runner, "plain_steps", 0),
        "step_seconds": {f"{('greedy', 'sampled')[r]} bucket {b}": [None if v != v else v for v in row]
                         for r, regime in enumerate(times.tolist()) for b, row in enumerate(regime)
                         if any(v == v for v in row)}
        if (times := getattr(runner, "times_in_use", None)) is not None else None,
    }


class FusedCPUModelRunner(FusedStepMixin, CPUModelRunner):
    """vLLM's CPU runner with the fused step."""


class FusedGPUModelRunner(FusedStepMixin, GPUModelRunner):
    """vLLM's V1 GPU runner with the fused step."""
