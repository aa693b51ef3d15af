"""The Gemma 4 assistant (``Gemma4MTPModel``) as the plugin runs it under tensor parallelism.

vLLM's ``Gemma4MTP`` shards every projection. Two of them sit on each draft step's critical path for almost
no compute: ``pre_projection`` (``[token embedding | target hidden] -> draft hidden``, column-parallel, then an
all-gather) and ``post_projection`` (``draft hidden -> target hidden``, row-parallel, then an all-reduce).
Here both are replicated: every rank holds the whole (small) matrices and computes them alone, which saves
two collectives per draft step and gives every rank the same numbers as a single device. Query heads (each
rank's heads read that rank's shard of the target KV), the MLP and the vocab-parallel head stay sharded;
norms are replicated as in vLLM. Checkpoint keys are unchanged (``pre_projection.weight``,
``post_projection.weight``).
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models import gemma4_mtp


class Gemma4MTP(gemma4_mtp.Gemma4MTP):
    """vLLM's Gemma 4 assistant with replicated pre/post projections."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        predictor = self.model
        predictor.pre_projection = ReplicatedLinear(
            2 * predictor.backbone_hidden_size, predictor.hidden_size, bias=False,
            quant_config=predictor.quant_config, prefix=predictor.pre_projection.prefix)
        predictor.post_projection = ReplicatedLinear(
            predictor.hidden_size, predictor.backbone_hidden_size, bias=False,
            quant_config=predictor.quant_config, prefix=predictor.post_projection.prefix)
