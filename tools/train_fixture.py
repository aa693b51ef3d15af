"""Train the bundled tiny Gemma 4 pair: a target and two MTP assistants.

Deterministic (fixed seeds, 2 threads) and sized for a 2-core CPU (about 25 minutes).

    python tools/train_fixture.py --out fixtures/gemma4-tiny

Corpus: the top-level ``*.py`` modules of the running interpreter's standard library
(CPython 3.11.7 for the committed fixture). The files in ``HELD_OUT`` are never trained on;
they give the held-out perplexity and the acceptance prompts. ``corpus.json`` in the output
records every file used with its SHA-256.

Outputs, under ``--out``:
- ``target/``: ``Gemma4ForCausalLM`` (sliding + full layers with different head dims,
  per-layer inputs, the last two layers KV-shared), tokenizer and chat template;
- ``assistant/``: ``Gemma4AssistantForCausalLM`` distilled from the target;
- ``assistant-centroids/``: the same assistant with ordered embeddings and a trained
  centroid head over a balanced k-means clustering of its output embeddings;
- ``corpus.json``, ``held_out_prompts.json`` and ``training.json`` (the recorded figures).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    PreTrainedTokenizerFast,
)

SEED = 1234
VOCAB_SIZE = 4096
SEQ_LEN = 256
SLIDING_WINDOW = 128
HELD_OUT = (
    "bisect.py", "colorsys.py", "fractions.py", "heapq.py",
    "netrc.py", "shlex.py", "textwrap.py", "uuid.py",
)
# Gemma 4's special tokens, in id order (pad=0, eos=1, bos=2 as in Gemma 4 checkpoints).
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|channel>", "<channel|>",
    "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if enable_thinking is defined and enable_thinking %}<|channel>thought\n{% endif %}"
    "{% endif %}"
)


def seed_everything() -> None:
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------- corpus
def read_corpus() -> tuple[dict[str, str], dict[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held = {}, {}
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if path.name in HELD_OUT else train)[path.name] = text
    return train, held


def chat_documents(sources: dict[str, str]) -> list[str]:
    """Turn documented functions into chat turns whose answer opens with a thinking block."""
    docs = []
    for name in sorted(sources):
        try:
            tree = ast.parse(sources[name])
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            doc = ast.get_docstring(node)
            body = ast.get_source_segment(sources[name], node)
            if not doc or not body or len(body) > 1500:
                continue
            signature = body.split("\n", 1)[0].strip()
            thought = doc.split("\n\n", 1)[0].strip()
            docs.append(
                f"<|turn>user\nWrite `{signature}` from {name[:-3]}.<turn|>\n"
                f"<|turn>model\n<|channel>thought\n{thought}<channel|>{body}<turn|>\n"
            )
    return docs


# -------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=SPECIAL_TOKENS[5:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch,), generator=gen)
        yield torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 30) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ----------------------------------------------------------------------------- models
def rope_parameters() -> dict:
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1_000_000.0},
    }


def target_config() -> Gemma4TextConfig:
    cfg = Gemma4TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=192, intermediate_size=768,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, global_head_dim=96,
        layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3
        + ["full_attention"],
        sliding_window=SLIDING_WINDOW, max_position_embeddings=4096,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB_SIZE,
        num_kv_shared_layers=2, final_logit_softcapping=30.0, rope_parameters=rope_parameters(),
        pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2, tie_word_embeddings=True,
    )
    cfg.architectures = ["Gemma4ForCausalLM"]
    return cfg


def assistant_config(use_ordered_embeddings: bool) -> Gemma4AssistantConfig:
    text = Gemma4TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, global_head_dim=96,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=SLIDING_WINDOW, max_position_embeddings=4096,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        num_kv_shared_layers=2, final_logit_softcapping=None, rope_parameters=rope_parameters(),
        pad_token_id=0, eos_token_id=[1, 6], bos_token_id=2,
    )
    cfg = Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=192, use_ordered_embeddings=use_ordered_embeddings,
        num_centroids=64, centroid_intermediate_top_k=8, tie_word_embeddings=True,
    )
    cfg.architectures = ["Gemma4AssistantForCausalLM"]
    return cfg


def target_forward(target: Gemma4ForCausalLM, ids: torch.Tensor):
    """Final-norm hidden states, soft-capped logits and the shared K/V the assistant reads."""
    shared: dict = {}
    hidden = target.model(input_ids=ids, shared_kv_states=shared).last_hidden_state
    logits = target.lm_head(hidden)
    cap = target.config.final_logit_softcapping
    logits = torch.tanh(logits / cap) * cap
    return hidden, logits, shared


def draft_masks(length: int, keys: int) -> dict[str, torch.Tensor]:
    """Query t (holding h_t and token t+1) sees target K/V at positions <= t only."""
    q = torch.arange(length)[:, None]
    k = torch.arange(keys)[None, :]
    causal = k <= q
    return {
        "full_attention": causal[None, None],
        "sliding_attention": (causal & (k > q - SLIDING_WINDOW))[None, None],
    }


def assistant_unroll(assistant, target, ids, hidden, shared, steps: int):
    """Yield (step j, draft final-norm hidden) for j=0..steps-1 over every start position.

    Step j at position t takes the true token x[t+1+j] and, for j=0, the target's h_t, else the
    previous step's projected state; it predicts x[t+2+j]. The RoPE position stays at t.
    """
    batch, seq = ids.shape
    length = seq - steps - 1
    masks = {k: v.expand(batch, 1, length, seq) for k, v in draft_masks(length, seq).items()}
    positions = torch.arange(length)[None].expand(batch, length)
    state = hidden[:, :length]
    embed = target.model.embed_tokens
    for j in range(steps):
        x = torch.cat([embed(ids[:, 1 + j : 1 + j + length]), state], dim=-1)
        out = assistant.model(
            inputs_embeds=assistant.pre_projection(x), attention_mask=masks,
            position_ids=positions, shared_kv_states=shared,
        ).last_hidden_state
        yield j, out
        state = assistant.post_projection(out)


# ---------------------------------------------------------------------------- phases
def train_target(stream, steps, batch, log) -> Gemma4ForCausalLM:
    torch.manual_seed(SEED)
    model = Gemma4ForCausalLM(target_config()).float()
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.time()
    for step, ids in enumerate(batches(stream, batch, steps, gen)):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 3e-3)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"target step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return model.eval()


def train_assistant(target, stream, steps, batch, draft_steps, log) -> Gemma4AssistantForCausalLM:
    torch.manual_seed(SEED + 1)
    assistant = Gemma4AssistantForCausalLM(assistant_config(False)).float()
    assistant.config._attn_implementation = "sdpa"
    assistant.model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(assistant.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(SEED + 1)
    t0 = time.time()
    for step, ids in enumerate(batches(stream, batch, steps, gen)):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 3e-3)
        with torch.no_grad():
            hidden, logits, shared = target_forward(target, ids)
        loss = 0.0
        length = ids.shape[1] - draft_steps - 1
        for j, out in assistant_unroll(assistant, target, ids, hidden, shared, draft_steps):
            teacher = F.log_softmax(logits[:, 1 + j : 1 + j + length], dim=-1)
            student = F.log_softmax(assistant.lm_head(out), dim=-1)
            loss = loss + F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1),
                                   log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(assistant.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"assistant step {step}/{steps} kl {loss.item() / draft_steps:.3f} "
                f"({time.time() - t0:.0f}s)")
    return assistant.eval()


def balanced_kmeans(points: torch.Tensor, clusters: int, iters: int = 20) -> torch.Tensor:
    """Token ordering: every row in exactly one cluster, ``len(points) // clusters`` per cluster."""
    gen = torch.Generator().manual_seed(SEED + 2)
    x = F.normalize(points, dim=-1)
    centers = x[torch.randperm(len(x), generator=gen)[:clusters]].clone()
    per = len(x) // clusters
    for _ in range(iters):
        assign = torch.empty(len(x), dtype=torch.long)
        score = x @ centers.T  # cosine similarity
        order = torch.argsort(score.flatten(), descending=True, stable=True)
        fill = torch.zeros(clusters, dtype=torch.long)
        done = torch.zeros(len(x), dtype=torch.bool)
        for flat in order.tolist():  # greedy capacity-constrained assignment
            row, col = divmod(flat, clusters)
            if done[row] or fill[col] >= per:
                continue
            assign[row], done[row] = col, True
            fill[col] += 1
            if int(fill.sum()) == len(x):
                break
        centers = F.normalize(torch.stack([x[assign == c].mean(0) for c in range(clusters)]), dim=-1)
    return torch.cat([torch.nonzero(assign == c).flatten() for c in range(clusters)])


def train_centroids(target, plain, stream, steps, batch, draft_steps, log):
    """Copy the plain assistant, cluster its output embeddings, and train the centroid head."""
    torch.manual_seed(SEED + 3)
    cfg = assistant_config(True)
    assistant = Gemma4AssistantForCausalLM(cfg).float()
    missing = assistant.load_state_dict(plain.state_dict(), strict=False)
    assert not missing.unexpected_keys, missing
    assistant.config._attn_implementation = "sdpa"
    assistant.model.config._attn_implementation = "sdpa"
    ordering = balanced_kmeans(assistant.lm_head.weight.detach(), cfg.num_centroids)
    assistant.masked_embedding.token_ordering.copy_(ordering)
    cluster_of = torch.empty(VOCAB_SIZE, dtype=torch.long)
    cluster_of[ordering] = torch.arange(VOCAB_SIZE) // (VOCAB_SIZE // cfg.num_centroids)
    head = assistant.masked_embedding.centroids
    for p in assistant.parameters():
        p.requires_grad_(False)
    head.weight.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(SEED + 3)
    t0 = time.time()
    for step, ids in enumerate(batches(stream, batch, steps, gen)):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 1e-2)
        with torch.no_grad():
            hidden, logits, shared = target_forward(target, ids)
            outs = list(assistant_unroll(assistant, target, ids, hidden, shared, draft_steps))
        length = ids.shape[1] - draft_steps - 1
        loss = 0.0
        for j, out in outs:
            probs = F.softmax(logits[:, 1 + j : 1 + j + length], dim=-1)
            mass = torch.zeros(*probs.shape[:2], cfg.num_centroids).index_add_(2, cluster_of, probs)
            loss = loss - (mass * F.log_softmax(head(out), dim=-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"centroids step {step}/{steps} ce {loss.item() / draft_steps:.3f} "
                f"({time.time() - t0:.0f}s)")
    for p in assistant.parameters():
        p.requires_grad_(True)
    return assistant.eval()


@torch.no_grad()
def perplexity(target, stream: torch.Tensor, windows: int = 64) -> float:
    total, count = 0.0, 0
    for i in range(min(windows, (len(stream) - 1) // SEQ_LEN)):
        ids = stream[i * SEQ_LEN : (i + 1) * SEQ_LEN][None]
        _, logits, _ = target_forward(target, ids)
        total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += SEQ_LEN - 1
    return math.exp(total / count)


@torch.no_grad()
def draft_top1_agreement(target, assistant, stream: torch.Tensor, draft_steps: int) -> list[float]:
    """Per-step rate at which the draft's argmax equals the target's (teacher-forced)."""
    hits = [0] * draft_steps
    ids = stream[: 8 * SEQ_LEN].view(8, SEQ_LEN)
    hidden, logits, shared = target_forward(target, ids)
    length = SEQ_LEN - draft_steps - 1
    for j, out in assistant_unroll(assistant, target, ids, hidden, shared, draft_steps):
        if assistant.masked_embedding is not None:
            draft = assistant.masked_embedding(out, assistant.lm_head.weight)
        else:
            draft = assistant.lm_head(out)
        hits[j] = (draft.argmax(-1) == logits[:, 1 + j : 1 + j + length].argmax(-1)).float().mean().item()
    return hits


def round_to_bf16(model: torch.nn.Module) -> None:
    """The fixture ships bf16 weights; every figure is measured on exactly those values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def save(model, path: Path) -> None:
    model.config.dtype = "float32"
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model.float()
    cfg = json.loads((path / "config.json").read_text())
    cfg["dtype"] = "float32"  # bf16 on disk, computed in fp32 by default
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def held_out_prompts(tokenizer, held: dict[str, str], count: int = 32, length: int = 96) -> list[str]:
    """Prompts cut from held-out files at line starts: about ``length`` tokens each."""
    prompts = []
    rng = random.Random(SEED + 4)
    names = sorted(held)
    while len(prompts) < count:
        text = held[names[len(prompts) % len(names)]]
        lines = text.splitlines(keepends=True)
        start = rng.randrange(0, max(1, len(lines) - 40))
        chunk = ""
        for line in lines[start:]:
            if len(tokenizer(chunk + line)["input_ids"]) > length:
                break
            chunk += line
        if chunk.strip():
            prompts.append(chunk)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("fixtures/gemma4-tiny"))
    ap.add_argument("--target-steps", type=int, default=600)
    ap.add_argument("--assistant-steps", type=int, default=400)
    ap.add_argument("--centroid-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--draft-steps", type=int, default=3)
    args = ap.parse_args()
    seed_everything()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    train, held = read_corpus()
    chats = chat_documents(train)
    log(f"corpus: {len(train)} train files, {len(held)} held out, {len(chats)} chat documents")
    tokenizer = train_tokenizer(list(train.values()) + chats)
    docs = list(train.values()) + chats
    random.Random(SEED).shuffle(docs)
    stream = token_stream(tokenizer, docs)
    held_stream = token_stream(tokenizer, [held[n] for n in sorted(held)])
    log(f"tokens: {len(stream)} train, {len(held_stream)} held out")

    target = train_target(stream, args.target_steps, args.batch, log)
    round_to_bf16(target)
    ppl = perplexity(target, held_stream)
    log(f"held-out perplexity {ppl:.2f}")
    target.requires_grad_(False)

    plain = train_assistant(target, stream, args.assistant_steps, args.batch // 2, args.draft_steps, log)
    round_to_bf16(plain)
    centroids = train_centroids(target, plain, stream, args.centroid_steps, args.batch // 2,
                                args.draft_steps, log)
    round_to_bf16(centroids)

    save(target, out / "target")
    tokenizer.save_pretrained(out / "target")
    (out / "target" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": [1, 6], "pad_token_id": 0}, indent=2) + "\n")
    save(plain, out / "assistant")
    save(centroids, out / "assistant-centroids")

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (out / "corpus.json").write_text(json.dumps({
        "stdlib": str(stdlib),
        "python": sysconfig.get_python_version(),
        "train": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in sorted(train.items())},
        "held_out": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in sorted(held.items())},
        "chat_documents": len(chats),
        "train_tokens": len(stream),
        "held_out_tokens": len(held_stream),
    }, indent=1) + "\n")
    (out / "held_out_prompts.json").write_text(
        json.dumps(held_out_prompts(tokenizer, held), indent=1) + "\n")
    (out / "training.json").write_text(json.dumps({
        "seed": SEED, "seq_len": SEQ_LEN, "batch": args.batch,
        "target_steps": args.target_steps, "assistant_steps": args.assistant_steps,
        "centroid_steps": args.centroid_steps, "draft_steps_unrolled": args.draft_steps,
        "held_out_perplexity": round(ppl, 3),
        "teacher_forced_top1_agreement": {
            "assistant": [round(v, 4) for v in draft_top1_agreement(target, plain, held_stream, 3)],
            "assistant-centroids": [
                round(v, 4) for v in draft_top1_agreement(target, centroids, held_stream, 3)],
        },
        "wall_seconds": round(time.time() - started),
    }, indent=2) + "\n")
    log("done")


if __name__ == "__main__":
    main()
