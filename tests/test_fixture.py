"""The bundled tiny Gemma 4 pair: shapes, tokenizer, chat template, clustering and validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from vllm_mtp_gemma4.checkpoint import CheckpointError, check_checkpoint, main

from .conftest import ASSISTANT, ASSISTANT_CENTROIDS, TARGET

FIXTURE = TARGET.parent


def test_committed_size_is_at_most_25_mb():
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024, total


def test_target_has_the_shapes_that_make_gemma4_hard():
    cfg = AutoConfig.from_pretrained(TARGET)
    assert cfg.architectures == ["Gemma4ForCausalLM"]
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
    head_dims = {t: {cfg.per_layer_config[i].head_dim for i, u in enumerate(cfg.layer_types) if u == t}
                 for t in ("sliding_attention", "full_attention")}
    assert head_dims["sliding_attention"].isdisjoint(head_dims["full_attention"]), head_dims
    assert cfg.hidden_size_per_layer_input > 0
    assert 0 < cfg.num_kv_shared_layers < cfg.num_hidden_layers
    for assistant in (ASSISTANT, ASSISTANT_CENTROIDS):
        draft = AutoConfig.from_pretrained(assistant)
        assert draft.architectures == ["Gemma4AssistantForCausalLM"]
        assert draft.backbone_hidden_size == cfg.hidden_size
        assert set(draft.text_config.layer_types) == {"sliding_attention", "full_attention"}
        assert cfg.num_hidden_layers >= 4 * draft.text_config.num_hidden_layers


def test_tokenizer_has_gemma4_special_tokens_and_thinking_template():
    tok = AutoTokenizer.from_pretrained(TARGET)
    cfg = AutoConfig.from_pretrained(TARGET)
    assert len(tok) <= 8192
    assert (tok.bos_token_id, tok.pad_token_id) == (cfg.bos_token_id, cfg.pad_token_id)
    assert tok.eos_token_id in cfg.eos_token_id
    vocab = tok.get_vocab()
    for special in ("<bos>", "<eos>", "<pad>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"):
        assert special in vocab
        assert tok.convert_tokens_to_ids(tok.tokenize(special)) == [vocab[special]]
    messages = [{"role": "user", "content": "Write `def f(x):`."}]
    thinking = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True, tokenize=False)
    assert thinking.startswith("<bos><|turn>user\n") and thinking.endswith("<|turn>model\n<|channel>thought\n")
    plain = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert plain.endswith("<|turn>model\n")


def test_centroid_assistant_orders_vocab_by_a_real_clustering():
    cfg = AutoConfig.from_pretrained(ASSISTANT_CENTROIDS)
    weights = load_file(ASSISTANT_CENTROIDS / "model.safetensors")
    ordering = weights["masked_embedding.token_ordering"].long()
    vocab = cfg.text_config.vocab_size
    assert cfg.use_ordered_embeddings and vocab % cfg.num_centroids == 0
    assert torch.equal(torch.sort(ordering).values, torch.arange(vocab)), "not a partition of the vocabulary"
    emb = torch.nn.functional.normalize(weights["model.embed_tokens.weight"].float(), dim=-1)
    groups = emb[ordering].view(cfg.num_centroids, vocab // cfg.num_centroids, -1)
    centers = torch.nn.functional.normalize(groups.mean(1), dim=-1)
    within = (groups * centers[:, None]).sum(-1).mean()
    shuffled = emb[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))].view_as(groups)
    random_within = (shuffled * torch.nn.functional.normalize(shuffled.mean(1), dim=-1)[:, None]).sum(-1).mean()
    assert within > random_within + 0.1, (within, random_within)
    assert weights["masked_embedding.centroids.weight"].float().std() > 0


def test_fixture_checkpoints_pass_validation():
    assert main([str(TARGET), str(ASSISTANT), str(ASSISTANT_CENTROIDS)]) == 0


@pytest.fixture()
def broken(tmp_path) -> Path:
    copy = tmp_path / "target"
    shutil.copytree(TARGET, copy)
    return copy


def test_missing_weights_name_the_file(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file not found"):
        check_checkpoint(broken)


def test_truncated_weights_name_the_file(broken):
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        check_checkpoint(broken)


def test_malformed_config_reports_line_and_column(broken, capsys):
    (broken / "config.json").write_text('{\n  "hidden_size": 192,\n  oops\n}\n')
    assert main([str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, "one line, no traceback"
    assert "config.json: malformed JSON at line 3, column 3" in err


def test_config_that_does_not_match_weights_names_both_files(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["hidden_size"] = 256
    (broken / "config.json").write_text(json.dumps(cfg))
    mismatch = r"model\.safetensors: tensor .* has shape .* but \S*config\.json implies"
    with pytest.raises(CheckpointError, match=mismatch):
        check_checkpoint(broken)
