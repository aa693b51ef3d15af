"""``mtp.json``: loading, validation and the plugin's own section. No vLLM import.

One file holds vLLM's standard ``SpeculativeConfig`` keys and, under ``"vllm_mtp_gemma4"``, the
plugin's settings. The section is validated and removed before vLLM sees the rest (vLLM forbids
unknown keys), then travels to every worker in ``VllmConfig.additional_config[SECTION]``.

Every check here runs before any weights load and raises ``MTPConfigError``, whose message is one
line naming the file, key or field and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

SECTION = "vllm_mtp_gemma4"
MTP_METHODS = ("mtp", "gemma4_mtp")
GEMMA4_TARGET_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
GEMMA4_ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
THINKING_OPEN = "<|channel>"  # Gemma 4 opens a thinking block with this token and closes it with THINKING_CLOSE
THINKING_CLOSE = "<channel|>"
COMMENT_PREFIX = "//"  # JSON has no comments: keys starting with "//" annotate a config file and are dropped


class MTPConfigError(ValueError):
    """Bad speculative configuration; the message is one line meant for the user."""


@dataclass(frozen=True)
class RelaxedAcceptance:
    """Relaxed acceptance inside thinking: accept d iff d is in the target's top ``topk`` and
    p(d) >= p_top1 - ``delta`` (raw softmax). ``enabled`` applies it to sampled rows; greedy rows opt in per request."""

    enabled: bool = False
    topk: int = 10
    delta: float = 0.6


RELAXED_KEYS = {"relaxed_acceptance": "enabled", "relaxed_topk": "topk", "relaxed_delta": "delta"}
"""Key in ``mtp.json``'s section and in ``SamplingParams.extra_args`` -> ``RelaxedAcceptance`` field."""
FUSED_REJECTION_METHODS = ("standard", "synthetic")
"""vLLM's ``rejection_sample_method`` values the fused step honours ("synthetic": benchmarks only, not lossless)."""
ADAPTIVE_BY_DEFAULT = False
"""Whether ``adaptive_k`` left out plans each step (on V1 with the fused step), or drafts K every step."""
DRAFT_CAP_KEY = "num_speculative_tokens"
"""``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP): the most drafts a request sends per step (0: none)."""


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's section of ``mtp.json``. Every key is documented in the README."""

    fused: bool | None = None  # None: the runner's default (V1: the plugin's fused step; V2: V2's own step)
    relaxed_acceptance: bool = False
    relaxed_topk: int = 10
    relaxed_delta: float = 0.6
    adaptive_k: bool | None = None  # None: the runner's default (ADAPTIVE_BY_DEFAULT where the fused step runs)

    @classmethod
    def from_dict(cls, section: Any, where: str = SECTION) -> PluginConfig:
        if not isinstance(section, dict):
            raise MTPConfigError(f"{where}: must be a JSON object, got {type(section).__name__}")
        known = {f.name: f for f in fields(cls)}
        for key in section:
            if key not in known:
                raise MTPConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(known))})")
        for flag in ("fused", "adaptive_k"):
            if not isinstance(section.get(flag, False), bool | None):
                raise MTPConfigError(f"{where}.{flag}: must be true or false, got {section[flag]!r}")
        check_relaxed_options(section, where)
        return cls(**section)

    def for_runner(self, runner: str, rejection_sample_method: str = "standard") -> PluginConfig:
        """This config as ``runner`` ("V1" or "V2") runs it, ``fused`` resolved; a one-line error for a setting that
        runner cannot honour (``rejection_sample_method``: the speculative config's, as vLLM resolved it)."""
        if runner == "V2":
            if self.fused:
                raise MTPConfigError(
                    f"{SECTION}.fused: the plugin's fused step runs on Model Runner V1 only, and this engine runs V2 "
                    f"(vLLM's default on CUDA), whose own step verifies and drafts on the device; remove the key, or "
                    f"set VLLM_USE_V2_MODEL_RUNNER=0 for V1")
            if self.adaptive_k:
                raise MTPConfigError(
                    f"{SECTION}.adaptive_k: not available on Model Runner V2, which this engine runs; use vLLM's own "
                    f"\"enable_adaptive_verification\": true in the speculative config, or VLLM_USE_V2_MODEL_RUNNER=0")
            return replace(self, fused=False, adaptive_k=False)
        fused = self.fused is not False
        for feature in ("relaxed_acceptance", "adaptive_k"):
            if getattr(self, feature) and not fused:
                raise MTPConfigError(f"{SECTION}.{feature}: needs the fused step on Model Runner V1 (\"fused\": true)")
        if fused and rejection_sample_method not in FUSED_REJECTION_METHODS:
            raise MTPConfigError(
                f"speculative config 'rejection_sample_method': {rejection_sample_method!r} is not available with the "
                f"plugin's fused step on Model Runner V1 (allowed: {', '.join(map(repr, FUSED_REJECTION_METHODS))}); "
                f"set {SECTION}.fused to false for vLLM's own step")
        if fused and rejection_sample_method == "synthetic" and self.relaxed_acceptance:
            raise MTPConfigError(f"{SECTION}.relaxed_acceptance: not with 'rejection_sample_method': 'synthetic', "
                                 f"whose rates replace every accept test")
        adaptive = (fused and ADAPTIVE_BY_DEFAULT) if self.adaptive_k is None else self.adaptive_k
        return replace(self, fused=fused, adaptive_k=adaptive)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> PluginConfig | None:
        """The config that ``resolve`` placed in ``VllmConfig.additional_config``; None when the plugin is off."""
        section = (additional_config or {}).get(SECTION)
        return None if section is None else cls.from_dict(section)

    @property
    def relaxed(self) -> RelaxedAcceptance:
        return RelaxedAcceptance(self.relaxed_acceptance, self.relaxed_topk, self.relaxed_delta)

    def relaxed_for_request(self, extra_args: dict[str, Any] | None) -> tuple[RelaxedAcceptance, bool]:
        """The request's relaxed settings and whether it opted in itself (which extends them to greedy rows)."""
        overrides = {RELAXED_KEYS[k]: v for k, v in request_options(extra_args).items()}
        settings = RelaxedAcceptance(**{**asdict(self.relaxed), **overrides})
        return settings, overrides.get("enabled") is True


def check_relaxed_options(options: dict[str, Any], where: str) -> None:
    """One-line errors for the relaxed-acceptance keys of ``options`` (config section or ``extra_args``)."""
    flag = options.get("relaxed_acceptance", False)
    if not isinstance(flag, bool):
        allowed = "true or false (0 or 1 over HTTP)" if where == "vllm_xargs" else "true or false"
        raise MTPConfigError(f"{where}.relaxed_acceptance: must be {allowed}, got {flag!r}")
    topk = options.get("relaxed_topk", 1)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise MTPConfigError(f"{where}.relaxed_topk: must be an integer >= 1, got {topk!r}")
    delta = options.get("relaxed_delta", 0.0)
    if not isinstance(delta, int | float) or isinstance(delta, bool) or not 0.0 <= delta <= 1.0:
        raise MTPConfigError(f"{where}.relaxed_delta: must be a number in [0, 1], got {delta!r}")


def request_options(extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """The plugin's keys of a request's ``extra_args``. ``vllm_xargs`` carries no booleans over HTTP (vLLM types
    its values as str, int or float), so the flag also takes 0 and 1."""
    options = {k: v for k, v in (extra_args or {}).items() if k in RELAXED_KEYS}
    flag = options.get("relaxed_acceptance")
    if type(flag) is int and flag in (0, 1):
        options["relaxed_acceptance"] = bool(flag)
    return options


def check_request_options(extra_args: dict[str, Any] | None, relaxed_unavailable: str | None) -> None:
    """Validate a request's plugin keys in ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP);
    ``relaxed_unavailable``: why this engine cannot run relaxed acceptance (None: it can)."""
    options = request_options(extra_args)
    check_relaxed_options(options, "vllm_xargs")
    if options.get("relaxed_acceptance") and relaxed_unavailable:
        raise MTPConfigError(f"vllm_xargs.relaxed_acceptance: {relaxed_unavailable}")


def check_draft_cap(extra_args: dict[str, Any] | None, unavailable: str | None) -> None:
    """Validate a request's draft cap (``DRAFT_CAP_KEY``); ``unavailable``: why this engine cannot honour one (None:
    it can)."""
    if DRAFT_CAP_KEY not in (extra_args or {}):
        return
    cap = extra_args[DRAFT_CAP_KEY]
    if unavailable is not None:
        raise MTPConfigError(f"vllm_xargs.{DRAFT_CAP_KEY}: {unavailable}")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        raise MTPConfigError(f"vllm_xargs.{DRAFT_CAP_KEY}: must be an integer >= 0 (the most drafts per step; 0: "
                             f"none), got {cap!r}")


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file holding one object; every failure names the file (malformed: line and column)."""
    if not path.is_file():
        raise MTPConfigError(f"{path}: file not found")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MTPConfigError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise MTPConfigError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(loaded, dict):
        raise MTPConfigError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def load_speculative_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """``--speculative-config`` / ``speculative_config=``: a dict, inline JSON, or a JSON file path."""
    loaded = value if isinstance(value, dict) else _parse_speculative_config(value)
    return {k: v for k, v in loaded.items() if not k.startswith(COMMENT_PREFIX)}


def _parse_speculative_config(value: str) -> dict[str, Any]:
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise MTPConfigError(f"--speculative-config: {text}: no such file (give a JSON file or inline JSON)")
        return read_json_object(path)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise MTPConfigError(
            f"--speculative-config: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(loaded, dict):
        raise MTPConfigError(f"--speculative-config: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _check_types(spec: dict[str, Any], allowed_keys: set[str]) -> None:
    for key in spec:
        if key not in allowed_keys and key != SECTION:
            raise MTPConfigError(
                f"speculative config: unknown key {key!r} (allowed: vLLM's SpeculativeConfig fields and {SECTION!r})"
            )
    expected = {"method": str, "model": str, "num_speculative_tokens": int,
                "draft_tensor_parallel_size": int, "quantization": str}
    for key, kind in expected.items():
        if key in spec and spec[key] is not None and (
            not isinstance(spec[key], kind) or isinstance(spec[key], bool)
        ):
            raise MTPConfigError(
                f"speculative config: {key!r} must be {kind.__name__}, got {type(spec[key]).__name__} {spec[key]!r}"
            )


def take_section(spec: dict[str, Any], allowed_keys: set[str]) -> tuple[dict[str, Any], PluginConfig | None]:
    """vLLM's keys of ``spec`` and the plugin's config from its section; None without a section.

    A spec that carries the section declares itself the plugin's, so its keys, types, method and K are checked
    here, with one-line errors, before vLLM reads it. A spec without one goes to vLLM exactly as given: whether
    it is the plugin's is decided later, from vLLM's own resolved configs (``check_pair``).
    """
    rest = {k: v for k, v in spec.items() if k != SECTION}
    if SECTION not in spec:
        return rest, None
    _check_types(spec, allowed_keys)
    method = rest.get("method")
    if method not in MTP_METHODS:
        raise MTPConfigError(f"speculative config: 'method' must be 'mtp' to use {SECTION!r}, got {method!r}")
    k = rest.get("num_speculative_tokens")
    if k is None or k < 1:
        raise MTPConfigError(f"speculative config: 'num_speculative_tokens' must be an integer >= 1, got {k!r}")
    if not rest.get("model"):
        raise MTPConfigError("speculative config: 'model' must name the Gemma 4 assistant checkpoint")
    return rest, PluginConfig.from_dict(spec[SECTION])


def check_target(target: str, target_type: str | None) -> None:
    """A spec with the plugin's section needs a Gemma 4 target (``target_type``: vLLM's resolved text config)."""
    if target_type not in GEMMA4_TARGET_TYPES:
        raise MTPConfigError(
            f"model: {target}: target is {target_type!r}, not Gemma 4 (allowed: {', '.join(GEMMA4_TARGET_TYPES)})")


def check_pair(*, target: str, target_type: str | None, target_hidden: int | None, method: str, draft: str | None,
               draft_type: str | None, draft_is_assistant: bool, backbone_hidden: int | None,
               has_section: bool) -> bool:
    """Whether vLLM's resolved speculative config is the plugin's: MTP with a Gemma 4 target and a Gemma 4
    assistant draft (vLLM's ``SpeculativeConfig.use_gemma4_mtp``). Any other pair is vLLM's alone, unless its
    spec carries the plugin's section, which makes it one error naming the key."""
    ours = method == "mtp" and target_type in GEMMA4_TARGET_TYPES and draft_is_assistant
    if not has_section and not ours:
        return False
    check_target(target, target_type)
    if not draft_is_assistant:
        raise MTPConfigError(
            f"speculative config 'model': {draft}: model_type {draft_type!r} is not a Gemma 4 assistant "
            f"(allowed: {', '.join(GEMMA4_ASSISTANT_TYPES)})")
    if backbone_hidden != target_hidden:
        raise MTPConfigError(
            f"speculative config 'model': {draft}: backbone_hidden_size {backbone_hidden} does not match the "
            f"target's hidden_size {target_hidden}")
    return True


def vllm_refusal(error: Exception, spec: dict[str, Any]) -> MTPConfigError:
    """vLLM's own refusal of a spec that carries the plugin's section, as one line naming the key where vLLM
    names one (pydantic's field) and the draft otherwise, where vLLM could not load or run it."""
    details = error.errors() if callable(getattr(error, "errors", None)) else None
    message = str(details[0].get("msg", error)) if details else str(error)
    message = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    where = ".".join(str(p) for p in details[0].get("loc", ())) if details else ""
    if where:
        return MTPConfigError(f"speculative config {where!r}: {message}")
    draft = spec.get("model")
    if isinstance(error, NotImplementedError):  # vLLM found no MTP draft model in the checkpoint
        return MTPConfigError(f"speculative config 'model': {draft}: not a Gemma 4 assistant ({message}; allowed: "
                              f"a checkpoint with model_type {' or '.join(GEMMA4_ASSISTANT_TYPES)})")
    if draft and str(draft) in message:  # vLLM could not load the draft
        return MTPConfigError(f"speculative config 'model': {draft}: {message}")
    return MTPConfigError(f"speculative config: {message}")


def thinking_marker_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """Ids of Gemma 4's thinking markers in ``tokenizer`` (None where it lacks them)."""
    vocab = tokenizer.get_vocab()
    return vocab.get(THINKING_OPEN), vocab.get(THINKING_CLOSE)


def strict_token_ids(tokenizer: Any, eos_token_id: int | list[int] | None) -> list[int]:
    """Ids that relaxed acceptance never accepts (only the strict rule does): the closing thinking marker, the
    tokenizer's EOS and the model's ``eos_token_id`` (an int or a list)."""
    eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    ids = {thinking_marker_ids(tokenizer)[1], tokenizer.eos_token_id, *eos}
    return sorted(i for i in ids if i is not None)


def check_draft_parallelism(spec: dict[str, Any], tensor_parallel_size: int) -> None:
    """The assistant reads the target's KV shards in place, so it must be sharded exactly like the target."""
    draft_tp = spec.get("draft_tensor_parallel_size")
    if draft_tp is not None and draft_tp != tensor_parallel_size:
        raise MTPConfigError(
            f"speculative config: 'draft_tensor_parallel_size' is {draft_tp} but the target runs with "
            f"--tensor-parallel-size {tensor_parallel_size}; the assistant reads the target's KV shards, so they "
            f"must match (or leave the key out)"
        )
