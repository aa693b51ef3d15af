"""Gemma 4's multimodal stack on a CPU torch, for the test tree only: imported by every Python process started with
this folder on PYTHONPATH (``conftest.MM_ENV``: front end, engine core, workers, ``vllm serve``).

``Gemma4ForConditionalGeneration`` needs vLLM's ``gemma4_mm``, which imports transformers' ``Gemma4Processor`` and
so torchvision. PyPI has no torchvision for ``torch==2.13.0+cpu``; its ``torchvision==0.28.0`` (built for CUDA
torch 2.13.0, installed by ``scripts/test.sh`` with ``--no-deps --target .venv/test-torchvision``, outside
site-packages so that the product's environment is unchanged) imports once the two operator schemas its missing C
extension would have defined exist. Its Python image transforms, which Gemma 4's processor uses, then work; its own
C operators (nms, image decoding) stay absent. See shared notes ``vllm-0.32-facts.md``.

Model Runner V2's switch (``tests/mrv2/sitecustomize.py``) is run too: Python imports one ``sitecustomize`` only.
"""

import os
import runpy

if os.environ.get("VLLM_MTP_GEMMA4_TEST_TORCHVISION"):
    import sys

    import torch

    assert torch.version.cuda is None, "the test torchvision switch is for a CPU torch"
    sys.path.insert(0, os.environ["VLLM_MTP_GEMMA4_TEST_TORCHVISION"])
    _lib = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as the library
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mrv2", "sitecustomize.py"))
