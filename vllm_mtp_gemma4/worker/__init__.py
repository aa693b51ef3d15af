"""The plugin's side of vLLM's model runners: ``v1/`` for Model Runner V1, ``v2/`` for Model Runner V2, and
``ray_cpu`` (Ray worker actors on CPU nodes, either runner)."""

STEP_PHASES = ("target", "verify", "draft", "host")
"""Where a fused step's wall time goes, in order; "draft" includes the shift (the drafter's input prep)."""
