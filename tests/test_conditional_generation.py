"""``Gemma4ForConditionalGeneration``, the architecture of every published Gemma 4, with text and image prompts.

The fixture is the bundled trained pair under Gemma 4's multimodal wrapper with a tiny vision tower
(``tools/build_conditional_fixture.py``, built once per session into a temporary folder). Processes that load it
get Gemma 4's multimodal stack through the test tree's torchvision switch (``tests/mm/sitecustomize.py``).

In the default suite: greedy MTP with the plugin (V1) is token-identical to plain decoding, on text prompts and on
prompts with an image. Under ``-m scale``: the same on Model Runner V2 (Triton's interpreter) with the centroid
assistant, and an image chat request through ``vllm serve`` with the OpenAI client.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vllm_mtp_gemma4.bench.job import Job, JobResult, run_job

from .conftest import REPO, V2_ENV

pytestmark = pytest.mark.engine
TORCHVISION = REPO / ".venv" / "test-torchvision"  # installed by scripts/test.sh, outside site-packages
MM_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "mm"), str(REPO),
                                                      os.environ.get("PYTHONPATH")])),
          "VLLM_MTP_GEMMA4_TEST_TORCHVISION": str(TORCHVISION)}
TOKENS = 32
SAMPLING = {"temperature": 0.0, "max_tokens": TOKENS}
QUESTION = "Write `def area(shape):` for the shape in this picture."
IMAGE_PROMPT = "<|turn>user\n<|image|>" + QUESTION + "<turn|>\n<|turn>model\n"  # the chat template's rendering


@pytest.fixture(scope="session")
def mm_fixture(tmp_path_factory) -> Path:
    if not (TORCHVISION / "torchvision").is_dir():
        pytest.fail(f"no test torchvision at {TORCHVISION}: scripts/test.sh installs it (pip install --no-deps "
                    f"--target {TORCHVISION} torchvision==0.28.0)")
    out = tmp_path_factory.mktemp("gemma4-tiny-mm")
    subprocess.run([sys.executable, str(REPO / "tools" / "build_conditional_fixture.py"), "--out", str(out)],
                   check=True, env={**os.environ, **MM_ENV}, capture_output=True)
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Two pictures (different shapes, colours and sizes), drawn here."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, colour) in enumerate([((96, 96), (250, 30, 10)), ((160, 112), (10, 40, 240))]):
        image = Image.new("RGB", size, (20 + 100 * i, 120, 200 - 90 * i))
        draw = ImageDraw.Draw(image)
        draw.rectangle([10, 10, 40 + 30 * i, 50], fill=colour)
        draw.ellipse([50, 20, 90, 80 - 30 * i], fill=(0, 200 - 150 * i, 0))
        paths.append(folder / f"image{i}.png")
        image.save(paths[-1])
    return paths


def prompts(held_out: list[str], images: list[Path]) -> list:
    return held_out[:2] + [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": [str(p)]}} for p in images]


def engine(fixture: Path) -> dict:
    return {"model": str(fixture / "target"), "dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
            "limit_mm_per_prompt": {"image": 1, "video": 0}}


def spec(fixture: Path, assistant: str) -> dict:
    return {"method": "mtp", "model": str(fixture / assistant), "num_speculative_tokens": 3, "vllm_mtp_gemma4": {}}


@pytest.fixture(scope="module")
def cg_plain(mm_fixture, images, held_out_prompts) -> JobResult:
    return run_job(Job(engine=engine(mm_fixture), prompts=prompts(held_out_prompts, images), sampling=SAMPLING,
                       env=MM_ENV))


@pytest.fixture(scope="module")
def cg_plugin_v1(mm_fixture, images, held_out_prompts) -> JobResult:
    return run_job(Job(engine={**engine(mm_fixture), "speculative_config": spec(mm_fixture, "assistant")},
                       prompts=prompts(held_out_prompts, images), sampling=SAMPLING, env=MM_ENV))


def test_fixture_is_a_conditional_generation_checkpoint(mm_fixture):
    config = json.loads((mm_fixture / "target" / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert config["vision_config"]["default_output_length"] == 70
    tokenizer = json.loads((mm_fixture / "target" / "tokenizer_config.json").read_text())
    assert {tokenizer[k] for k in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token",
                                   "video_token")} == {"<|image|>", "<|image>", "<image|>", "<|audio|>", "<|audio>",
                                                       "<audio|>", "<|video|>"}
    assert (mm_fixture / "target" / "processor_config.json").exists()


def test_v1_greedy_text_and_image_prompts_identical_to_plain(cg_plain, cg_plugin_v1):
    """The wrapped target, the plugin's proposer on V1: plain decoding's tokens for text and image prompts.

    The two images give different answers, so the picture reached the model; drafts were made and accepted.
    """
    assert "Gemma4MTPProposer drafting K=3" in cg_plugin_v1.log
    assert cg_plugin_v1.token_ids == cg_plain.token_ids
    assert all(len(t) == TOKENS for t in cg_plain.token_ids)
    assert cg_plain.token_ids[2] != cg_plain.token_ids[3]
    assert cg_plugin_v1.spec.num_drafts > 0 and cg_plugin_v1.spec.num_accepted_tokens > 0


@pytest.mark.scale
def test_v2_greedy_text_and_image_prompts_identical_to_plain(mm_fixture, images, held_out_prompts, cg_plain):
    """Model Runner V2 (Triton's interpreter), the centroid assistant: plain decoding's tokens (V1's)."""
    result = run_job(Job(engine={**engine(mm_fixture), "speculative_config": spec(mm_fixture, "assistant-centroids")},
                         prompts=prompts(held_out_prompts, images), sampling=SAMPLING,
                         env={**V2_ENV, **MM_ENV}))
    assert "Using V2 Model Runner" in result.log and "vllm-mtp-gemma4: Model Runner V2" in result.log
    assert result.token_ids == cg_plain.token_ids
    assert result.spec.num_drafts > 0


@pytest.mark.scale
def test_image_chat_through_vllm_serve(mm_fixture, images, cg_plain, tmp_path):
    """An OpenAI chat request with an ``image_url`` data URI, served with the plugin: plain decoding's tokens."""
    from openai import OpenAI

    from vllm_mtp_gemma4.bench.load import MODEL_NAME, Server

    config = tmp_path / "mtp.json"
    config.write_text(json.dumps(spec(mm_fixture, "assistant")))
    uri = "data:image/png;base64," + base64.b64encode(images[1].read_bytes()).decode()
    extra = ("--enforce-eager", "--dtype", "float32", "--speculative-config", str(config),
             "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}))
    server = Server(tmp_path / "server.log", speculative=False, extra=extra, env=MM_ENV, model=mm_fixture / "target")
    try:
        server.wait_ready(timeout=900)  # a busy machine takes minutes to start a multimodal engine
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model=MODEL_NAME, temperature=0, max_tokens=TOKENS,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": QUESTION}]}],
            extra_body={"return_token_ids": True})
    finally:
        server.stop()
    assert "Gemma4MTPProposer drafting K=3" in (tmp_path / "server.log").read_text()
    image_token = json.loads((mm_fixture / "target" / "config.json").read_text())["image_token_id"]
    assert out.prompt_token_ids.count(image_token) > 0
    assert out.choices[0].token_ids == cg_plain.token_ids[3]
