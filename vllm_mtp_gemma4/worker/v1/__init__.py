"""Model Runner V1 (``gpu_model_runner.py``, ``cpu_model_runner.py``; the CPU default, and CUDA with
``VLLM_USE_V2_MODEL_RUNNER=0``): the plugin's proposer and its fused target-verify step."""
