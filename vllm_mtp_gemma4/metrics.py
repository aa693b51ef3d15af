"""The plugin's Prometheus metrics, in the front-end process's default registry.

vLLM's ``/metrics`` endpoint and ``LLM.get_metrics()`` both read that registry, so these show up in
both, next to vLLM's own ``vllm:spec_decode_*`` acceptance metrics. They are custom collectors:
vLLM unregisters every plain metric named ``vllm:*`` when its stat logger starts, and these must
survive that, since the plugin records them earlier, while the engine's config is resolved.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class _ProposerInfo(Collector):
    """``vllm:mtp_gemma4_proposer_info{runner, drafter, assistant, num_speculative_tokens} 1`` for what each engine's
    workers report drafting with (``worker/info.py``), once the engine has started."""

    LABELS = ("runner", "drafter", "assistant", "num_speculative_tokens")

    def __init__(self) -> None:
        self.drafters: set[tuple[str, ...]] = set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vllm:mtp_gemma4_proposer_info",
            "1 for each drafter the engine's workers report, with their model runner and assistant class.",
            labels=list(self.LABELS),
        )
        for labels in sorted(self.drafters):
            family.add_metric(list(labels), 1)
        yield family


PROPOSER_INFO = _ProposerInfo()
REGISTRY.register(PROPOSER_INFO)


def record_drafters(reports: list[dict[str, str] | None]) -> None:
    """The workers' ``drafter_info`` reports (None from workers that do not draft)."""
    for report in reports:
        if report is not None:
            PROPOSER_INFO.drafters.add(tuple(report[k] for k in _ProposerInfo.LABELS))


PHASES = ("thinking", "answer")
PHASE_LABELS = ("model_name", "engine", "phase")  # vLLM's own per-engine labels (``PrometheusStatLogger``), and phase


class _PhaseAcceptance(Collector):
    """Speculative steps and accepted drafts, split by whether the request was thinking when the step began, per
    served model and engine index like vLLM's ``vllm:spec_decode_*``; reported once an engine of the plugin's is
    configured in this process (``enabled``), so other engines' ``/metrics`` stay vLLM's.

    Counted in the front end from each engine step's output, one per request and step: a step that commits n
    tokens accepted n - 1 drafts. A request's first output comes from its prefill and is not a speculative step.
    Mean acceptance length per phase = 1 + accepted / steps.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.steps: dict[tuple[str, str, str], int] = {}  # (model_name, engine, phase) -> count
        self.accepted: dict[tuple[str, str, str], int] = {}

    def add(self, labels: tuple[str, str, str], accepted: int) -> None:
        self.steps[labels] = self.steps.get(labels, 0) + 1
        self.accepted[labels] = self.accepted.get(labels, 0) + accepted

    def seed(self, model_name: str, engine: str) -> None:
        """Zeros for an engine's phases, so the series exist from the start, as vLLM's own counters do."""
        for phase in PHASES:
            self.steps.setdefault((model_name, engine, phase), 0)
            self.accepted.setdefault((model_name, engine, phase), 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        if not self.enabled:
            return
        steps = CounterMetricFamily("vllm:mtp_gemma4_spec_steps", "Speculative steps per request, by phase.",
                                    labels=list(PHASE_LABELS))
        accepted = CounterMetricFamily("vllm:mtp_gemma4_accepted_tokens", "Accepted draft tokens, by phase.",
                                       labels=list(PHASE_LABELS))
        for labels in sorted(self.steps):
            steps.add_metric(list(labels), self.steps[labels])
            accepted.add_metric(list(labels), self.accepted[labels])
        yield steps
        yield accepted


PHASE_ACCEPTANCE = _PhaseAcceptance()
REGISTRY.register(PHASE_ACCEPTANCE)


class PhaseTracker:
    """One front end's (``OutputProcessor``'s) live requests: whether each is thinking after its committed tokens.

    A request leaves on its finishing output, or when the front end drops it without one (an abort: a client that
    disconnects, a cut stream), by ``release``."""

    def __init__(self, model_name: str, engines: list[int]) -> None:
        self.model_name = model_name
        self.thinking: dict[str, bool] = {}  # request id -> state after its committed tokens
        for engine in engines:
            PHASE_ACCEPTANCE.seed(model_name, str(engine))

    def observe(self, request_id: str, prompt_ids: list[int] | None, new_ids: list[int], finished: bool,
                markers: tuple[int, int], engine: int) -> None:
        """One engine step's output for a request the front end holds."""
        from vllm_mtp_gemma4.ops import thinking_after

        if request_id not in self.thinking:
            if new_ids:  # the first token, from the prefill (a partial prefill's output has none)
                self.thinking[request_id] = thinking_after(thinking_after(False, prompt_ids or [], *markers),
                                                           new_ids, *markers)
        elif new_ids:
            phase = "thinking" if self.thinking[request_id] else "answer"
            PHASE_ACCEPTANCE.add((self.model_name, str(engine), phase), len(new_ids) - 1)
            self.thinking[request_id] = thinking_after(self.thinking[request_id], new_ids, *markers)
        if finished:
            self.thinking.pop(request_id, None)

    def release(self, live: Container[str]) -> None:
        """Forget the requests that the front end no longer holds (``live``: its request ids)."""
        for request_id in [r for r in self.thinking if r not in live]:
            del self.thinking[request_id]
