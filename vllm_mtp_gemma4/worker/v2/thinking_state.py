"""Per request slot, on the device: whether a request's committed tokens leave a thinking block open.

Read once at admission (the tokens V2 prefills: the prompt, plus the output so far on resumption after
preemption), then advanced each step by the tokens committed since the slot's last step: at most K + 1 per step,
so a step reads ``(K + 1) x steps since`` tokens per request, never its history. V2's own thinking-budget state
(``sample/thinking_budget.py``) keeps its markers the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

from vllm_mtp_gemma4.ops import advance_thinking, thinking_at_lengths


class ThinkingState:
    """``inside[slot]``: the thinking state after the slot's first ``scanned[slot]`` committed tokens."""

    def __init__(self, req_states: LogitsProcRequestState, open_id: int, close_id: int,
                 max_tokens_per_step: int) -> None:
        self.req_states = req_states
        self.open_id, self.close_id = open_id, close_id
        self.max_tokens_per_step = max_tokens_per_step
        device, n = req_states.device, req_states.max_num_reqs
        self.inside = torch.zeros(n, dtype=torch.bool, device=device)
        self.scanned = torch.zeros(n, dtype=torch.int64, device=device)
        self.step = 0
        self.last_step = np.zeros(n, dtype=np.int64)  # host: the step that last advanced each slot
        self.admitted: list[int] = []

    def add_request(self, slot: int) -> None:
        self.admitted.append(slot)

    def apply_staged_writes(self) -> None:
        """Once per step, after V2 has written the admitted requests' tokens: their state, from those tokens."""
        self.step += 1
        if not self.admitted:
            return
        slots_np = np.array(self.admitted, dtype=np.int64)
        self.admitted.clear()
        lengths_np = self.req_states.prefill_len.np[slots_np].astype(np.int64)
        slots = async_tensor_h2d(slots_np, device=self.inside.device)
        lengths = async_tensor_h2d(lengths_np, device=self.inside.device)
        tokens = self.req_states.all_token_ids.gpu[slots, :max(1, int(lengths_np.max()))]
        self.inside[slots] = thinking_at_lengths(tokens, lengths, self.open_id, self.close_id)
        self.scanned[slots] = lengths
        self.last_step[slots_np] = self.step

    def advance(self, slots_np: np.ndarray, slots: torch.Tensor) -> None:
        """Bring ``inside[slots]`` to the state after all but the last committed token of each slot (the token a
        step feeds first), folding in what was committed since the slot's last step."""
        token_ids = self.req_states.all_token_ids.gpu
        steps = int((self.step - self.last_step[slots_np]).max())
        width = min(self.max_tokens_per_step * max(1, steps), token_ids.shape[1])
        upto = (self.req_states.total_len.gpu[slots].long() - 1).clamp(min=0)
        start = (upto - width).clamp(min=0)
        columns = (start[:, None] + torch.arange(width, device=slots.device)).clamp(max=token_ids.shape[1] - 1)
        window = token_ids[slots[:, None], columns]
        inside, scanned = advance_thinking(self.inside[slots], self.scanned[slots], window, start, upto,
                                           self.open_id, self.close_id)
        self.inside[slots], self.scanned[slots] = inside, scanned
        self.last_step[slots_np] = self.step
