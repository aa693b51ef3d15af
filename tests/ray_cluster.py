"""Real Ray clusters for tests, one node on loopback or two nodes on a veth pair, that leave nothing running.

Ray binds to the machine's non-loopback interface even when asked for 127.0.0.1, so the cluster runs in
fresh network and PID namespaces (``unshare``; the tests run as root): the network namespace has only
``lo``, and killing the namespace's first process ends every process in it, Ray workers included. Engine
jobs join both namespaces (``nsenter``) so that Ray sees their PIDs.

The cluster runs with token auth on a token of its own, in the environment of the cluster and of the jobs that
join it (``env``): Ray reads ``RAY_AUTH_TOKEN`` ahead of ``~/.ray/auth_token``, so a token an earlier Ray run left
there changes nothing here.

Two nodes (``TwoNodes``): two named network namespaces joined by a veth pair, with TEST-NET addresses and no other
route, so no other address is ever a target. Each node runs ``ray start`` in its own PID and mount namespaces with
a private ``/dev/shm``, as separate machines have: shared memory cannot carry traffic between the nodes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY_PORT = 6379
START_TIMEOUT_S = 60
# Runs a command as the first process of fresh PID, network and mount namespaces with only ``lo`` up: when it
# exits, so does every process it started (a Ray instance included).
ISOLATED = ["unshare", "--pid", "--net", "--mount-proc", "--fork", "--kill-child",
            "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
HEAD_IP, WORKER_IP = "192.0.2.1", "192.0.2.2"  # TEST-NET-1 (RFC 5737): never a real host


def _node(netns: str) -> list[str]:
    """Like ``ISOLATED``, in the named network namespace ``netns``, with a /dev/shm of its own."""
    return ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--pid", "--mount-proc", "--fork", "--kill-child",
            "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"']


class RayCluster:
    """``ray start`` with ``resources`` in its own PID namespace and network namespace (fresh with only ``lo``, or
    the named ``netns`` where the node has address ``ip``): the head, or a node that joins ``head``."""

    def __init__(self, resources: dict[str, float], num_cpus: int = 2, *, netns: str | None = None,
                 ip: str = "127.0.0.1", head: RayCluster | None = None, node_env: dict[str, str] | None = None) -> None:
        self._temp = Path(tempfile.mkdtemp(prefix="mtp-ray-"))
        ray = Path(sys.executable).with_name("ray")
        self.log_path = self._temp / "cluster.log"
        self.ip, self._head_ip = ip, head.ip if head else ip
        self.auth = head.auth if head else {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        role = ["--address", f"{self._head_ip}:{RAY_PORT}"] if head else ["--head", "--port", str(RAY_PORT)]
        self._proc = subprocess.Popen(
            [*(_node(netns) if netns else ISOLATED), str(ray), "start", *role, "--block", "--node-ip-address", ip,
             "--num-cpus", str(num_cpus), "--resources", json.dumps(resources), "--temp-dir", str(self._temp),
             *([] if head else ["--include-dashboard", "false"]), "--disable-usage-stats"],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth, **(node_env or {})},
        )
        self.init_pid = self._namespace_init()
        self.pid_namespace = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        self._wait_until_up()

    @property
    def launcher(self) -> list[str]:
        """A command prefix that runs a command inside the cluster's namespaces."""
        return ["nsenter", "-t", str(self.init_pid), "--pid", "--net", "--mount"]

    @property
    def env(self) -> dict[str, str]:
        """What a job needs to join the cluster: its address and its token."""
        return {"RAY_ADDRESS": f"{self._head_ip}:{RAY_PORT}", "RAY_USAGE_STATS_ENABLED": "0", **self.auth}

    def processes(self, name: str = "") -> list[int]:
        """PIDs (as seen from here) of the cluster namespace's processes whose command line contains ``name``."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns/pid") == self.pid_namespace and name in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        """Kill the namespace's first process; the kernel then kills every process left in the namespace."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)  # unshare --kill-child passes it on to the namespace init
            self._proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self._temp, ignore_errors=True)

    def _namespace_init(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise RuntimeError("unshare started no namespace")

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{self.log_path.read_text()[-3000:]}")
            if "Ray runtime started" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Ray cluster not up within {START_TIMEOUT_S} s")


class TwoNodes:
    """A head (``HEAD_IP``) and a worker node (``WORKER_IP``), one veth pair between their network namespaces, each
    node a ``RayCluster`` with ``resources``; ``head_env`` / ``worker_env`` add to each node's environment."""

    def __init__(self, resources: dict[str, float], head_env: dict[str, str] | None = None,
                 worker_env: dict[str, str] | None = None) -> None:
        tag = secrets.token_hex(3)
        self.netns = {"head": f"mtp-head-{tag}", "worker": f"mtp-worker-{tag}"}
        self.veth = {"head": f"mtp-h-{tag}", "worker": f"mtp-w-{tag}"}  # interface names: 15 characters at most
        self.head: RayCluster | None = None
        self.worker: RayCluster | None = None
        try:
            for ns in self.netns.values():
                _ip("netns", "add", ns)
            _ip("link", "add", self.veth["head"], "netns", self.netns["head"], "type", "veth",
                "peer", "name", self.veth["worker"], "netns", self.netns["worker"])
            for node, ip in (("head", HEAD_IP), ("worker", WORKER_IP)):
                ns = ["-n", self.netns[node]]
                _ip(*ns, "link", "set", "lo", "up")
                _ip(*ns, "addr", "add", f"{ip}/30", "dev", self.veth[node])  # a /30: one link, no default route
                _ip(*ns, "link", "set", self.veth[node], "up")
            self.head = RayCluster(resources, netns=self.netns["head"], ip=HEAD_IP, node_env=head_env)
            self.worker = RayCluster(resources, netns=self.netns["worker"], ip=WORKER_IP, head=self.head,
                                     node_env=worker_env)
        except BaseException:
            self.stop()
            raise

    def bytes(self) -> int:
        """Bytes the head's end of the veth pair has sent and received so far: all traffic between the nodes."""
        stats = json.loads(_ip("-n", self.netns["head"], "-j", "-s", "link", "show", self.veth["head"]))[0]
        return stats["stats64"]["rx"]["bytes"] + stats["stats64"]["tx"]["bytes"]

    def left_behind(self) -> list[str]:
        """This cluster's processes, network namespaces and interfaces that are still there."""
        processes = [str(pid) for node in (self.head, self.worker) if node for pid in node.processes()]
        names = set(_ip("netns", "list").split()) | set(_ip("-o", "link", "show").split())
        return processes + sorted(n.rstrip(":").split("@")[0] for n in names
                                  if n.rstrip(":").split("@")[0] in {*self.netns.values(), *self.veth.values()})

    def stop(self) -> None:
        for node in (self.worker, self.head):
            if node:
                node.stop()
        for ns in self.netns.values():  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout
