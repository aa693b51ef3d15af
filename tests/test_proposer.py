"""The plugin's Gemma 4 MTP proposer drafts (not upstream's), reading the target's own KV blocks."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


def test_plugin_proposer_ran_and_is_visible(plugin_mtp_greedy, upstream_mtp_greedy):
    assert "vllm-mtp-gemma4: Gemma4MTPProposer drafting K=3" in plugin_mtp_greedy.log
    # Reported by the worker that drafts, from its live runner.
    info = "vllm:mtp_gemma4_proposer_info"
    assert plugin_mtp_greedy.metrics.get(info) == 1
    assert plugin_mtp_greedy.metrics.get(f"{info}{{runner=V1}}") == 1
    assert plugin_mtp_greedy.metrics.get(f"{info}{{drafter=Gemma4MTPProposer (fused step)}}") == 1
    assert plugin_mtp_greedy.metrics.get(f"{info}{{assistant=vllm_mtp_gemma4.models.gemma4_mtp.Gemma4MTP}}") == 1
    assert "Gemma4MTPProposer" not in upstream_mtp_greedy.log
    assert "vllm:mtp_gemma4_proposer_info" not in upstream_mtp_greedy.metrics


def test_drafts_are_those_of_vllms_loop(plugin_mtp_greedy, upstream_mtp_greedy):
    """The plugin's draft loop (B gathered rows, metadata once) drafts what vLLM's does: greedy verification of the
    same drafts accepts the same number at every position, on all 32 prompts."""
    assert "draft loop the plugin's" in plugin_mtp_greedy.log
    assert plugin_mtp_greedy.token_ids == upstream_mtp_greedy.token_ids
    assert plugin_mtp_greedy.spec == upstream_mtp_greedy.spec


def test_draft_reads_last_unshared_sliding_and_full_target_layers(plugin_mtp_greedy):
    # Target layers 0-5 own KV (6-7 share it): the last sliding one is 5, the last full one is 3.
    assert "{0: 'model.layers.5.self_attn.attn', 1: 'model.layers.3.self_attn.attn'}" in plugin_mtp_greedy.log


def test_no_kv_cache_of_its_own(plugin_mtp_greedy, plain_greedy):
    assert plugin_mtp_greedy.kv_blocks == plain_greedy.kv_blocks > 0


def test_greedy_identical_and_acceptance_reported(plugin_mtp_greedy, plain_greedy):
    assert plugin_mtp_greedy.token_ids == plain_greedy.token_ids
    spec = plugin_mtp_greedy.spec
    assert len(spec.accepted_per_pos) == 3 and spec.num_drafts > 0
    assert spec.mean_acceptance_length >= 2.0
    assert spec.accepted_per_pos[0] >= spec.accepted_per_pos[1] >= spec.accepted_per_pos[2]
