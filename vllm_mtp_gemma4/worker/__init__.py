"""The fused target-verify model runner and its worker."""
