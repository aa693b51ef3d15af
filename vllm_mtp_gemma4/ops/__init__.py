"""Pure tensor functions of the speculative step (merge, verify, shift, draft glue).

Nothing here imports vLLM, so every op runs and is tested alone, on CPU or GPU.
"""
