"""Build the ConditionalGeneration fixture: the bundled trained text pair under Gemma 4's multimodal wrapper.

Every published Gemma 4 is a ``Gemma4ForConditionalGeneration`` checkpoint. This wraps the bundled
``fixtures/gemma4-tiny`` target (trained, fp32 CausalLM) in one, with what a real checkpoint carries:
- the special tokens of images, video and audio (``<|image|>``, ``<|image>``, ``<image|>``, ``<|video|>``,
  ``<|audio|>``, ``<|audio>``, ``<audio|>``), named in ``tokenizer_config.json`` as Google's are, with their ids in
  ``config.json``; the vocabulary grows to 4,160 (a multiple of the centroid assistant's 64 clusters, the rest
  ``<unused_i>``), and the assistants' with it. New rows copy ``<pad>``'s, which the trained model never emits;
- a tiny vision tower (random, seeded) with ``vision_config.default_output_length`` (read by vLLM, not defined by
  transformers' config class) of 70 soft tokens, the smallest budget Gemma 4's image processor allows;
- the processor files of ``Gemma4Processor(...).save_pretrained`` and a chat template that places ``<|image|>`` for
  each image part of a message;
- no audio tower (``audio_config`` null), as a text+vision checkpoint (26B-A4B, 31B) has none.

Deterministic: the same files, byte for byte, on every run (fixed seed, weights saved in bf16 as the bundled
fixture's). About 17 MB in all (target 12.4 MB, each assistant 2.3 MB); built at test time (a few seconds) into a
temporary folder, not committed.

Needs transformers' ``Gemma4Processor``, so torchvision: run it as the tests do, with ``tests/mm`` on
PYTHONPATH and ``VLLM_MTP_GEMMA4_TEST_TORCHVISION`` set (``tests/conftest.py``'s ``MM_ENV``).

    python tools/build_conditional_fixture.py --out /tmp/gemma4-tiny-mm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4Processor,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "fixtures" / "gemma4-tiny"
SEED = 1234
VOCAB_SIZE = 4160  # 4,096 + 64: the centroid assistant's 64 clusters keep equal sizes
SOFT_TOKENS = 70  # per image; one of Gemma4ImageProcessor's allowed budgets (70, 140, 280, 560, 1120)
# name in tokenizer_config.json -> (token, name of its id in config.json), as in Google's checkpoints
MM_TOKENS = {
    "image_token": ("<|image|>", "image_token_id"),
    "boi_token": ("<|image>", "boi_token_id"),
    "eoi_token": ("<image|>", "eoi_token_id"),
    "video_token": ("<|video|>", "video_token_id"),
    "audio_token": ("<|audio|>", "audio_token_id"),
    "boa_token": ("<|audio>", "boa_token_id"),
    "eoa_token": ("<audio|>", "eoa_token_index"),
}
VISION = {  # tiny, and shaped like Gemma 4's (patch 16, 3x3 pooling)
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "head_dim": 16, "patch_size": 16, "pooling_kernel_size": 3,
    "position_embedding_size": 1024, "standardize": False,
}
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if enable_thinking is defined and enable_thinking %}<|channel>thought\n{% endif %}"
    "{% endif %}"
)


def grow_rows(weight: torch.Tensor, rows: int, like: int = 0) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each a copy of row ``like`` (``<pad>``)."""
    return torch.cat([weight, weight[like:like + 1].expand(rows - weight.shape[0], -1)])


def build_tokenizer(out: Path):
    tok = AutoTokenizer.from_pretrained(SOURCE / "target")
    new = [token for token, _ in MM_TOKENS.values()]
    new += [f"<unused_{i}>" for i in range(VOCAB_SIZE - len(tok) - len(new))]
    tok.add_tokens(new, special_tokens=True)
    assert len(tok) == VOCAB_SIZE
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({name: token for name, (token, _) in MM_TOKENS.items()})
    cfg["processor_class"] = "Gemma4Processor"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok = AutoTokenizer.from_pretrained(out)
    ids = {name: tok.convert_tokens_to_ids(token) for name, (token, _) in MM_TOKENS.items()}
    assert tok.image_token_id == ids["image_token"] and tok.audio_token == "<|audio|>", "named tokens not read back"
    return tok, ids


def build_target(out: Path, ids: dict[str, int]) -> None:
    text_config = AutoConfig.from_pretrained(SOURCE / "target").to_dict()
    text_config.update(vocab_size=VOCAB_SIZE, vocab_size_per_layer_input=VOCAB_SIZE, architectures=None)
    config = Gemma4Config(
        text_config=text_config, vision_config=VISION, audio_config=None,
        **{id_name: ids[name] for name, (_, id_name) in MM_TOKENS.items()},
    )
    torch.manual_seed(SEED)
    model = Gemma4ForConditionalGeneration(config).eval()
    # Pictures steer the answer, so that a test can see the image reach the model: the default init (position
    # table of ones, patches through std 0.02) gives nearly one soft token for every patch of every picture, and
    # soft tokens about 6x smaller than text embeddings.
    patches = model.model.vision_tower.patch_embedder
    torch.nn.init.normal_(patches.input_proj.weight, std=patches.input_proj.in_features ** -0.5)
    torch.nn.init.normal_(patches.position_embedding_table, std=0.1)
    torch.nn.init.normal_(model.model.embed_vision.embedding_projection.weight, std=VISION["hidden_size"] ** -0.5)
    text = load_file(SOURCE / "target" / "model.safetensors")
    state = {}
    for name, tensor in text.items():
        tensor = tensor.float()
        if name in ("model.embed_tokens.weight", "model.embed_tokens_per_layer.weight"):
            tensor = grow_rows(tensor, VOCAB_SIZE)
        state[name.removeprefix("model.")] = tensor
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("rotary_emb.inv_freq")], (missing, unexpected)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vision_config"]["default_output_length"] = SOFT_TOKENS  # vLLM's gemma4_mm reads it
    cfg["dtype"] = "float32"
    cfg["text_config"]["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_bytes((SOURCE / "target" / "generation_config.json").read_bytes())


def build_assistant(name: str, out: Path) -> None:
    src = SOURCE / name
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = VOCAB_SIZE
    state = load_file(src / "model.safetensors")
    state["model.embed_tokens.weight"] = grow_rows(state["model.embed_tokens.weight"], VOCAB_SIZE)
    if "masked_embedding.token_ordering" in state:  # one new token joins each cluster
        clusters = cfg["num_centroids"]
        ordering = state["masked_embedding.token_ordering"].view(clusters, -1)
        extra = torch.arange(ordering.numel(), VOCAB_SIZE, dtype=ordering.dtype).view(clusters, -1)
        state["masked_embedding.token_ordering"] = torch.cat([ordering, extra], dim=1).reshape(-1).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())


def build(out: Path) -> None:
    torch.set_num_threads(2)
    target = out / "target"
    target.mkdir(parents=True, exist_ok=True)
    tok, ids = build_tokenizer(target)
    build_target(target, ids)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=SOFT_TOKENS),
        tokenizer=tok, video_processor=Gemma4VideoProcessor(), chat_template=CHAT_TEMPLATE,
        image_seq_length=SOFT_TOKENS,
    )
    processor.save_pretrained(target)
    (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    for name in ("assistant", "assistant-centroids"):
        build_assistant(name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
