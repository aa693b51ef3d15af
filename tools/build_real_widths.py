"""Build random-weight Gemma 4 pairs at the published widths of each ``configs/examples`` model.

For each of E2B, E4B, 26B-A4B and 31B: a ``Gemma4ForCausalLM`` target with that model's published text widths
(vocabulary, hidden and intermediate sizes, heads, KV heads, head dims 256 sliding / 512 full, sliding window,
per-layer inputs, KV sharing, K=V full attention, experts) and its MTP assistant at the assistant's published
widths (centroid head for E2B/E4B, dense for 26B-A4B/31B). Only the layers the sliding/full pattern and the
assistant's KV sources need are kept: one sliding and one full layer that own KV, plus, where the model shares KV
(E2B, E4B), one sliding and one full layer that read it (the E2B's double-wide MLP included).

Where each number comes from (published ``config.json`` files of ``google/gemma-4-*-it`` and
``google/gemma-4-*-it-assistant``, as copied into public code; the first found copy is named):
- E2B target: hidden 1536, intermediate 6144 (double-wide on KV-shared layers), 8 heads, 1 KV head, head dims
  256/512, window 512, per-layer inputs 256 (vocab 262,144), 20 KV-shared of 35 layers (4 sliding : 1 full) --
  the E2B ``config.json`` as parsed in a public Rust test (``test_parse_gemma4_e2b_config``) and a Python test
  (``test_gemma4_e2b_config_from_hf_dict``).
- E2B assistant: backbone 1536, hidden 256, intermediate 2048, 4 layers (3 sliding, 1 full), 4 heads, 1 KV head,
  ordered embeddings, 2048 centroids, top-32 -- a verbatim dump of ``google/gemma-4-E2B-it-assistant``'s
  ``config.json`` (transformers 5.7.0.dev0) in a public agent log; the same numbers in an ROCm port's constants.
- E4B target: hidden 2560, intermediate 10240, 8 heads, 2 KV heads, 256/512, window 512, per-layer inputs 256,
  18 KV-shared of 42 layers (5 sliding : 1 full), no double-wide MLP -- several public parsers of the E4B config
  (``TestParseTextConfigE4B``, a Core ML port's ``GEMMA4_E4B``).
- E4B assistant: backbone 2560, hidden 256, intermediate 2048, 4 layers, 4 heads, 2 KV heads, 2048 centroids,
  top-32 -- a Rust test ``config_parses_real_json`` and a Zig test of the E4B drafter ``config.json``.
- 26B-A4B target: hidden 2816, dense intermediate 2112, 128 experts, top-8, expert intermediate 704, 16 heads,
  8 KV heads (2 on full layers), 256/512, window 1024, K=V, 30 layers (5:1), no per-layer inputs, no KV sharing --
  a Rust ``test_gemma4_config_parse`` and a Python MoE config fixture of the 26B-A4B.
- 26B-A4B assistant: backbone 2816, hidden 1024, intermediate 8192, 4 layers, dense head (no ordered embeddings)
  -- a Swift compatibility test's A4B pair. Its heads are not published in what we found: chosen equal to the
  target's (16 heads, 8/2 KV heads, K=V), which the assistant's Q-only attention into the target's KV requires.
- 31B target: hidden 5376, intermediate 21504, 32 heads, 16 KV heads (4 on full layers), 256/512, window 1024,
  K=V, 60 layers (5:1), no per-layer inputs, no KV sharing -- ``google/gemma-4-31B`` as written in a public
  Python test (``GEMMA4_31B_CONFIG``) and a LoRA planner's ``GEOMETRY``.
- 31B assistant: backbone 5376, hidden 1024, intermediate 8192, 4 layers, 32 heads, 16 KV heads (4 full), K=V,
  dense head -- an mlx-swift-lm ``Gemma4AssistantTests`` config. Its sliding window there (512) is a synthetic
  value; the target's 1024 is used, as the assistant attends over the target's sliding KV.
Vocabulary 262,144, softcapping 30, RoPE (10k default sliding; 1M proportional, 25% partial, full) as all four.

Weights: seeded normal(0, 0.02) for matrices (transformers' ``initializer_range``), ones for norms, layer and router
scalars, a seeded permutation for the centroid head's token ordering; stored in bf16 (as published) in 2 GB
shards. A word-level tokenizer over the 262,144 ids (tests prompt with token ids). Deterministic; nothing here is
committed.

    python tools/build_real_widths.py --out ~/.cache/vllm-mtp-gemma4/real-widths [--models e2b e4b 26b-a4b 31b] \
        [--dense-assistant]

``--dense-assistant`` adds ``<model>/assistant-dense`` for E2B and E4B: the same assistant with a dense head
(``use_ordered_embeddings`` off), for upstream vLLM on CPU, which cannot start a centroid head without CUDA graphs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4ForCausalLM, Gemma4TextConfig

REPO = Path(__file__).resolve().parent.parent
VOCAB = 262_144
ROPE = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}}
S, F = "sliding_attention", "full_attention"
COMMON = {"vocab_size": VOCAB, "head_dim": 256, "global_head_dim": 512, "rope_parameters": ROPE,
          "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
          "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
TARGETS = {
    "e2b": {"hidden_size": 1536, "intermediate_size": 6144, "num_attention_heads": 8, "num_key_value_heads": 1,
            "sliding_window": 512, "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": VOCAB,
            "use_double_wide_mlp": True, "layer_types": [S, F, S, F], "num_kv_shared_layers": 2,
            "max_position_embeddings": 131_072},
    "e4b": {"hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8, "num_key_value_heads": 2,
            "sliding_window": 512, "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": VOCAB,
            "layer_types": [S, F, S, F], "num_kv_shared_layers": 2, "max_position_embeddings": 131_072},
    "26b-a4b": {"hidden_size": 2816, "intermediate_size": 2112, "num_attention_heads": 16, "num_key_value_heads": 8,
                "num_global_key_value_heads": 2, "attention_k_eq_v": True, "sliding_window": 1024,
                "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "enable_moe_block": True,
                "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704, "layer_types": [S, F],
                "num_kv_shared_layers": 0, "max_position_embeddings": 262_144},
    "31b": {"hidden_size": 5376, "intermediate_size": 21504, "num_attention_heads": 32, "num_key_value_heads": 16,
            "num_global_key_value_heads": 4, "attention_k_eq_v": True, "sliding_window": 1024,
            "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "layer_types": [S, F],
            "num_kv_shared_layers": 0, "max_position_embeddings": 262_144},
}
ASSISTANT_LAYERS = [S, S, S, F]
ASSISTANTS = {  # text widths; heads and KV layout follow the target's (Q-only attention into its KV)
    "e2b": {"hidden_size": 256, "intermediate_size": 2048, "num_attention_heads": 4, "centroids": True},
    "e4b": {"hidden_size": 256, "intermediate_size": 2048, "num_attention_heads": 4, "centroids": True},
    "26b-a4b": {"hidden_size": 1024, "intermediate_size": 8192, "num_attention_heads": 16, "centroids": False},
    "31b": {"hidden_size": 1024, "intermediate_size": 8192, "num_attention_heads": 32, "centroids": False},
}
CONFIG_EXAMPLES = {"e2b": "gemma-4-E2B-it.json", "e4b": "gemma-4-E4B-it.json",
                   "26b-a4b": "gemma-4-26B-A4B-it-tp2.json", "31b": "gemma-4-31B-it-tp2.json"}
SHARD_BYTES = 2 << 30
ONES = ("norm.weight", "layernorm.weight", "layer_scalar", "router.scale", "per_expert_scale")


def target_config(name: str) -> Gemma4TextConfig:
    widths = TARGETS[name]
    return Gemma4TextConfig(**COMMON, **widths, num_hidden_layers=len(widths["layer_types"]),
                            architectures=["Gemma4ForCausalLM"])


def assistant_config(name: str, centroids: bool | None = None) -> Gemma4AssistantConfig:
    """The published assistant's config; ``centroids`` False gives the same widths with a dense head."""
    target, widths = TARGETS[name], ASSISTANTS[name]
    centroids = widths["centroids"] if centroids is None else centroids
    text = {**COMMON, "hidden_size": widths["hidden_size"], "intermediate_size": widths["intermediate_size"],
            "num_attention_heads": widths["num_attention_heads"], "num_hidden_layers": len(ASSISTANT_LAYERS),
            "layer_types": ASSISTANT_LAYERS, "num_kv_shared_layers": len(ASSISTANT_LAYERS),
            "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
            "sliding_window": target["sliding_window"], "max_position_embeddings": target["max_position_embeddings"],
            **{k: target[k] for k in ("num_key_value_heads", "num_global_key_value_heads", "attention_k_eq_v")
               if k in target}}
    extra = {"num_centroids": 2048, "centroid_intermediate_top_k": 32} if centroids else {}
    return Gemma4AssistantConfig(text_config=text, backbone_hidden_size=target["hidden_size"],
                                 use_ordered_embeddings=centroids, tie_word_embeddings=True,
                                 architectures=["Gemma4AssistantForCausalLM"], **extra)


def init_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if name.endswith("token_ordering"):
        return torch.randperm(shape[0], generator=gen)
    if name.endswith(ONES):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)


def write_model(model_cls, config, out: Path, seed: int) -> int:
    """Seeded weights for every tensor the model saves, in shards; returns the parameter count."""
    with torch.device("meta"):
        model = model_cls(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    specs = [(k, v.shape, v.dtype) for k, v in model.state_dict().items() if k not in tied]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    shards, current, size, total = [], {}, 0, 0
    for name, shape, dtype in specs:
        store = dtype if dtype in (torch.int64, torch.int32) else torch.bfloat16
        tensor = init_tensor(name, shape, store, seed)
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel()
        if size >= SHARD_BYTES:
            shards.append(current)
            save_file(current, out / f"shard-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0
    if current:
        shards.append(current)
        save_file(current, out / f"shard-{len(shards):05d}.safetensors", metadata={"format": "pt"})
    weight_map = {name: f"shard-{i + 1:05d}.safetensors" for i, shard in enumerate(shards) for name in shard}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer over all 262,144 ids: Gemma 4's special tokens where the bundled fixture has them
    (the plugin reads the thinking markers from the tokenizer), ``t<id>`` for every other id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = json.loads((REPO / "fixtures/gemma4-tiny/target/tokenizer_config.json").read_text())
    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *specials["extra_special_tokens"]]
    vocab = {token: i for i, token in enumerate(names)} | {f"t{i}": i for i in range(len(names), VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>", mask_token="<mask>", extra_special_tokens=names[5:],
                            model_max_length=262_144).save_pretrained(out)


def build(name: str, root: Path, seed: int = 1234) -> Path:
    """``root/name/{target,assistant}``; skipped when a previous build with the same widths completed."""
    out = root / name
    key = hashlib.sha256(json.dumps([TARGETS[name], ASSISTANTS[name], COMMON, seed], sort_keys=True).encode())
    stamp = out / f".built-{key.hexdigest()[:16]}"
    if stamp.exists():
        if not (out / "target" / "tokenizer.json").exists():
            write_tokenizer(out / "target")
        return out
    counts = {"target": write_model(Gemma4ForCausalLM, target_config(name), out / "target", seed),
              "assistant": write_model(Gemma4AssistantForCausalLM, assistant_config(name), out / "assistant",
                                       seed + 1)}
    (out / "target" / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106],
                                                                        "pad_token_id": 0}))
    write_tokenizer(out / "target")
    stamp.write_text(json.dumps(counts) + "\n")
    return out


def build_dense_assistant(name: str, root: Path, seed: int = 1234) -> Path:
    """``root/name/assistant-dense``: the assistant at the same widths, dense head (``use_ordered_embeddings``
    off), every tensor they share equal to the centroid assistant's (same seed and names). Upstream vLLM 0.32 can
    only start a centroid assistant with CUDA graphs, so this is what it runs on CPU against the plugin."""
    if not ASSISTANTS[name]["centroids"]:
        raise ValueError(f"{name}: its assistant is dense already")
    out = root / name / "assistant-dense"
    key = hashlib.sha256(json.dumps([TARGETS[name], ASSISTANTS[name], COMMON, seed, "dense"],
                                    sort_keys=True).encode())
    stamp = out / f".built-{key.hexdigest()[:16]}"
    if not stamp.exists():
        count = write_model(Gemma4AssistantForCausalLM, assistant_config(name, centroids=False), out, seed + 1)
        stamp.write_text(json.dumps({"assistant": count}) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--dense-assistant", action="store_true",
                        help="also a dense-head copy of each centroid assistant (E2B, E4B): <model>/assistant-dense")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.models:
        print(name, build(name, args.out.expanduser()))
        if args.dense_assistant and ASSISTANTS[name]["centroids"]:
            print(name, build_dense_assistant(name, args.out.expanduser()))


if __name__ == "__main__":
    main()
