"""Checks that a Gemma 4 checkpoint directory is loadable, with one clear error naming the file.

vLLM reports a missing, truncated or mismatched checkpoint deep inside weight loading, as a
traceback. These checks read only ``config.json`` and the safetensors headers, so they run in
well under a second and before any weights load.

    python -m vllm_mtp_gemma4.checkpoint fixtures/gemma4-tiny/target fixtures/gemma4-tiny/assistant
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from vllm_mtp_gemma4.config import MTPConfigError, read_json_object

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


def read_config(path: Path) -> dict:
    """Parse a JSON config file, reporting line and column on malformed input."""
    try:
        return read_json_object(path)
    except MTPConfigError as e:
        raise CheckpointError(str(e)) from None


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape), validated against the file's size."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {header_len} > file size)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors file (unreadable header)") from None
    tensors = {}
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        expected = _DTYPE_BYTES.get(info["dtype"], 0)
        for dim in info["shape"]:
            expected *= dim
        if end > data_len or (expected and end - start != expected):
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r} is truncated)")
        tensors[name] = (info["dtype"], tuple(info["shape"]))
    return tensors


def expected_shapes(config_path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter and persistent-buffer shapes of the architecture in ``config.json``."""
    import torch
    import transformers

    config = read_config(config_path)
    architectures = config.get("architectures") or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise CheckpointError(f"{config_path}: 'architectures' must name a transformers model, got {architectures}")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(config_path.parent)
        with torch.device("meta"):
            model = getattr(transformers, architectures[0])(hf_config)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad config
        raise CheckpointError(f"{config_path}: does not describe a valid {architectures[0]}: {e}") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def check_checkpoint(directory: Path) -> None:
    """Raise ``CheckpointError`` naming the offending file if ``directory`` cannot load."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    config_path = directory / "config.json"
    expected = expected_shapes(config_path)
    weights_path = directory / "model.safetensors"
    found = read_safetensors_header(weights_path)
    for name, (_, shape) in found.items():
        if name in expected and expected[name] != shape:
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has shape {list(shape)} but {config_path} "
                f"implies {list(expected[name])}"
            )
    missing = sorted(n for n in expected if n not in found)
    unexpected = sorted(n for n in found if n not in expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: does not match {config_path}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    if not dirs:
        print("usage: python -m vllm_mtp_gemma4.checkpoint DIR [DIR ...]", file=sys.stderr)
        return 2
    for d in dirs:
        try:
            check_checkpoint(d)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"ok: {', '.join(str(d) for d in dirs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
