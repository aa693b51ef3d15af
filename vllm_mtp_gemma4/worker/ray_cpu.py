"""Ray workers on CPU nodes.

vLLM places each Ray rank on one unit of the platform's Ray resource (``ray_device_key``). A CPU node
has no accelerator Ray knows of, so CPU ranks use a custom resource, ``vllm_cpu``: a node started with
``ray start --resources '{"vllm_cpu": N}'`` hosts up to N ranks (one per core set, as
``VLLM_CPU_OMP_THREADS_BIND`` splits them).
"""

from __future__ import annotations

import ray
from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

RAY_CPU_RESOURCE = "vllm_cpu"


class CPURayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker actor, minus the accelerator lookup a CPU rank cannot answer."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        # Ray reports accelerator ids only for accelerators it knows; a CPU rank has no device id.
        return ray.get_runtime_context().get_node_id(), []
