"""The fixture pair is a real MTP pair: vLLM's own MTP path (plugins off) accepts its drafts."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


def test_upstream_mtp_acceptance_length_is_at_least_2(upstream_mtp_greedy):
    spec = upstream_mtp_greedy.spec
    assert spec.num_drafts > 0, "no speculative steps ran"
    assert spec.mean_acceptance_length >= 2.0, (spec.mean_acceptance_length, spec.acceptance_rate_per_pos)


def test_upstream_mtp_greedy_equals_plain_decoding(upstream_mtp_greedy, plain_greedy):
    same = sum(a == b for a, b in zip(upstream_mtp_greedy.token_ids, plain_greedy.token_ids))
    assert same == len(plain_greedy.token_ids)
