"""Benchmark harness: plugin vs upstream MTP vs plain decoding, and its engine-job runner."""
