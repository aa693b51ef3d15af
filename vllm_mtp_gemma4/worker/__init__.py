"""The fused target-verify model runner and its worker."""

STEP_PHASES = ("target", "verify", "draft", "host")
"""Where a fused step's wall time goes, in order; "draft" includes the shift (the drafter's input prep)."""
