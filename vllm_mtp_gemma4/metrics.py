"""The plugin's Prometheus metrics, in the front-end process's default registry.

vLLM's ``/metrics`` endpoint and ``LLM.get_metrics()`` both read that registry, so these show up in
both, next to vLLM's own ``vllm:spec_decode_*`` acceptance metrics. They are custom collectors:
vLLM unregisters every plain metric named ``vllm:*`` when its stat logger starts, and these must
survive that, since the plugin records them earlier, while the engine's config is resolved.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _ProposerInfo(Collector):
    """``vllm:mtp_gemma4_proposer_info{num_speculative_tokens, assistant} 1`` per engine configured."""

    def __init__(self) -> None:
        self.engines: set[tuple[str, str]] = set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vllm:mtp_gemma4_proposer_info",
            "1 for each engine that drafts with the vllm-mtp-gemma4 Gemma 4 MTP proposer.",
            labels=["num_speculative_tokens", "assistant"],
        )
        for labels in sorted(self.engines):
            family.add_metric(list(labels), 1)
        yield family


PROPOSER_INFO = _ProposerInfo()
REGISTRY.register(PROPOSER_INFO)


def record_proposer(num_speculative_tokens: int, assistant: str) -> None:
    PROPOSER_INFO.engines.add((str(num_speculative_tokens), assistant))
