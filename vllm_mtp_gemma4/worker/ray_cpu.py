"""Ray workers on CPU nodes.

vLLM places each Ray rank on one unit of the platform's Ray resource (``ray_device_key``). A CPU node
has no accelerator Ray knows of, so CPU ranks use a custom resource, ``vllm_cpu``: a node started with
``ray start --resources '{"vllm_cpu": N}'`` hosts up to N ranks (one per core set, as
``VLLM_CPU_OMP_THREADS_BIND`` splits them).

Joining or starting Ray (``initialize_ray_cluster`` in ``patches._ray_on_cpu``) also minds Ray 2.60's token auth:
a local instance that Ray starts gets token auth by default and, where no token exists, Ray writes a new one to
``~/.ray/auth_token``. A later ``ray start --head`` on the machine finds that file and turns token auth on for its
cluster, which an engine given only ``RAY_ADDRESS`` then cannot join.

Across nodes (``CPURayWorkerProc.initialize_worker``), each rank's collectives follow its node's address
(``VLLM_HOST_IP`` there, else the ``--node-ip-address`` Ray uses): gloo otherwise picks the address its host name
resolves to, often loopback, and tells the other nodes to reach it there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import psutil
import ray
from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

RAY_CPU_RESOURCE = "vllm_cpu"


class CPURayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker actor, minus the accelerator lookup a CPU rank cannot answer."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        # Ray reports accelerator ids only for accelerators it knows; a CPU rank has no device id.
        return ray.get_runtime_context().get_node_id(), []

    def initialize_worker(self, local_rank: int, env_vars: dict[str, str], distributed_init_method: str,
                          driver_env_vars: dict[str, str] | None = None, **kwargs: Any) -> None:
        # vLLM's TP group advertises its message queue at get_ip(): the default route's address, or 0.0.0.0 without
        # one; the node's own address is the one the other nodes reach.
        address = os.environ.setdefault("VLLM_HOST_IP", ray.util.get_node_ip_address())
        vllm_config = self._init_kwargs["vllm_config"]
        _check_paths_here(vllm_config, address, self._init_kwargs["rank"])
        # The node's own GLOO_SOCKET_IFNAME, else the driver's (vLLM copies it over with setdefault), else ours.
        if not (os.environ.get("GLOO_SOCKET_IFNAME") or (driver_env_vars or {}).get("GLOO_SOCKET_IFNAME")):
            interface = interface_of(address)
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        super().initialize_worker(local_rank, env_vars, distributed_init_method, driver_env_vars, **kwargs)


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` on this node, or None."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def _check_paths_here(vllm_config: Any, address: str, rank: int) -> None:
    """A local checkpoint path missing on this node is one error naming node and path, ahead of the hub lookup
    that vLLM would try with it (paths arrive absolute: ``patches._resolve_speculative_config``)."""
    spec = vllm_config.speculative_config
    paths = {"model": vllm_config.model_config.model,
             "speculative config 'model'": spec.model if spec is not None else None}
    for role, path in paths.items():
        if path and os.path.isabs(path) and not os.path.isdir(path):
            raise FileNotFoundError(f"{role}: {path}: directory not found on Ray node {address} (rank {rank}); "
                                    f"every node needs the checkpoint at this path")


def cluster_to_join(address: str | None) -> str | None:
    """The cluster ``ray.init(address or "auto")`` joins (``RAY_ADDRESS``, else one ``ray start`` left on this
    node), or None where there is none. Decided before connecting, so that a cluster that refuses the engine is an
    error, never a reason to start a local instance instead."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address or "auto")
    except ConnectionError:  # "Could not find any running Ray instance"
        return None


def _token_source() -> str | None:
    """Where Ray would read this process's auth token from, in Ray's order; None where there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return str(path) if path.is_file() and path.stat().st_size else None


def start_local_ray(runtime_env: Any, units: int) -> None:
    """A local Ray instance with ``units`` of ``vllm_cpu`` that writes nothing to ``~/.ray``.

    Token auth stays on (Ray's default for a local instance: it runs whatever code reaches its ports), but where no
    token exists the instance gets a fresh one in this process's environment, which its own processes inherit,
    instead of one Ray would leave in ``~/.ray/auth_token`` for later clusters to pick up.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and _token_source() is None:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray.init(runtime_env=runtime_env, resources={RAY_CPU_RESOURCE: units})


def join_ray(address: str | None, cluster: str, runtime_env: Any) -> None:
    """``ray.init(address or "auto")`` to join ``cluster``; a refusal raises one error naming its cause."""
    mode, token = os.environ.get("RAY_AUTH_MODE", "unset"), _token_source()
    try:
        ray.init(address=address or "auto", runtime_env=runtime_env)
    except ConnectionError as e:
        auth = f"RAY_AUTH_MODE {mode}, token {token or 'none (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)'}"
        ray_says = str(e.__cause__ or e).strip().splitlines()[-1]  # the root cause, under Ray's wrappers
        if "InvalidAuthToken" in ray_says:
            raise ConnectionError(
                f"Ray cluster at {cluster} refused this engine's authentication ({auth}): the cluster runs with token "
                f"auth (its head had RAY_AUTH_MODE=token, or found ~/.ray/auth_token at `ray start`, perhaps left "
                f"by an earlier local Ray instance); set RAY_AUTH_MODE=token and the cluster's token here, or "
                f"start the cluster with RAY_AUTH_MODE=disabled") from None
        raise ConnectionError(f"Cannot join the Ray cluster at {cluster} ({auth}): {ray_says}") from None
