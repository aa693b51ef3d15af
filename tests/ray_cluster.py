"""A real one-node Ray cluster for tests, on loopback only, that leaves nothing running.

Ray binds to the machine's non-loopback interface even when asked for 127.0.0.1, so the cluster runs in
fresh network and PID namespaces (``unshare``; the tests run as root): the network namespace has only
``lo``, and killing the namespace's first process ends every process in it, Ray workers included. Engine
jobs join both namespaces (``nsenter``) so that Ray sees their PIDs.

The cluster runs with token auth on a token of its own, in the environment of the cluster and of the jobs that
join it (``env``): Ray reads ``RAY_AUTH_TOKEN`` ahead of ``~/.ray/auth_token``, so a token an earlier Ray run left
there changes nothing here.
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


class RayCluster:
    """``ray start --head`` with ``resources`` in its own network and PID namespaces."""

    def __init__(self, resources: dict[str, float], num_cpus: int = 2) -> None:
        self._temp = Path(tempfile.mkdtemp(prefix="mtp-ray-"))
        ray = Path(sys.executable).with_name("ray")
        self.log_path = self._temp / "cluster.log"
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._proc = subprocess.Popen(
            [*ISOLATED, str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(RAY_PORT), "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
             "--temp-dir", str(self._temp),
             "--include-dashboard", "false", "--disable-usage-stats"],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth},
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
        return {"RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}", "RAY_USAGE_STATS_ENABLED": "0", **self.auth}

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
