"""Tensor parallelism with speculation on CPU workers, ``mp`` and Ray backends: TP=2 gives TP=1's tokens.

Each rank's runner verifies the whole batch itself, so every rank must draw the same tokens: the noise key of an
unseeded request is a hash of its request id, never process-local randomness.

The Ray tests start a real one-node cluster on loopback (``tests/ray_cluster.py``) with two ``vllm_cpu`` units,
and check that nothing of it is left running afterwards. They run with a stale ``~/.ray/auth_token`` in place, as
an earlier local Ray instance leaves it (issue 18), and check that nothing is left in ``~/.ray`` either.

The two-node tests (issue 17) run the README's multi-node example on a head and a worker node in network namespaces
joined by a veth pair (``TwoNodes``), one ``vllm_cpu`` each, with the shipped ``configs/mtp.json`` read from the
repository root as a user would: TP=2 and PP=2 across the nodes, a checkpoint missing on the worker node, and the
worker node lost mid-generation (last: it ends the cluster's worker node).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_mtp_gemma4.bench import job
from vllm_mtp_gemma4.bench.job import Job, JobFailed, JobResult, first_error, run_job
from vllm_mtp_gemma4.worker.ray_cpu import RAY_CPU_RESOURCE

from .conftest import ASSISTANT, ASSISTANT_CENTROIDS, ENGINE, MULTIPROCESS, REPO, V2_ENV, mtp_config
from .ray_cluster import ISOLATED, RAY_PORT, WORKER_IP, RayCluster, TwoNodes

pytestmark = pytest.mark.engine
SPEC = {**mtp_config(3), "vllm_mtp_gemma4": {}}
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
TP2_RAY = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
FAULT_REPORT_S = 60  # a dead Ray worker must fail the engine within this
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank; vLLM's CPU TP needs an explicit binding
RAY_HOME = Path.home() / ".ray"
RAY_TOKEN = RAY_HOME / "auth_token"  # where Ray reads a token from by default, and writes one for a local instance


@pytest.fixture(scope="module", autouse=True)
def vllm_process_layout():
    """This module's engines run in vLLM's own processes (an engine core process, then the ranks), as users run TP,
    not in the job's process as other tests' engines do (``tests/conftest.py``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(job, "DEFAULT_ENV", {**job.DEFAULT_ENV, **MULTIPROCESS})
        yield


def _workload(prompts: list[str]) -> tuple[list[str], list[dict]]:
    greedy = [{"temperature": 0.0, "max_tokens": 48}] * 8
    seeded = [{"temperature": 0.8, "top_p": 0.95, "max_tokens": 48, "seed": 40 + i} for i in range(8)]
    return prompts[:8] * 2, greedy + seeded


@pytest.fixture(scope="module")
def tp1(held_out_prompts) -> JobResult:
    prompts, sampling = _workload(held_out_prompts)
    return run_job(Job(engine={**ENGINE, "speculative_config": SPEC}, prompts=prompts, sampling=sampling))


@pytest.fixture(scope="module")
def tp2(held_out_prompts) -> JobResult:
    prompts, sampling = _workload(held_out_prompts)
    return run_job(Job(engine={**ENGINE, **TP2, "speculative_config": SPEC}, prompts=prompts, sampling=sampling,
                       env=TP2_ENV, worker_counters=True))


def test_tp2_greedy_is_token_identical_to_tp1(tp1, tp2, plain_greedy):
    assert tp2.token_ids[:8] == tp1.token_ids[:8]
    assert [t[:48] for t in plain_greedy.token_ids[:8]] == tp2.token_ids[:8]
    assert len(tp2.worker_counters) == 2 and all(c["fused"] and c["steps"] > 0 for c in tp2.worker_counters)
    assert tp2.spec.num_drafts > 0
    assert "draft argmax vocab-parallel local" in tp2.log and "draft argmax over full logits" in tp1.log
    assert "with vllm_mtp_gemma4.models.gemma4_mtp.Gemma4MTP on cpu, projections replicated" in tp2.log


def test_tp2_centroid_assistant_with_local_argmax_is_token_identical(held_out_prompts, plain_greedy):
    """The centroid-masked head under TP=2 with ``use_local_argmax_reduction``: the sparse argmax, same tokens.

    With adaptive K: both ranks plan every step alike (rank 0's step times), or their draft collectives would
    not meet; a head without confidence verifies the plan's own counts."""
    spec = {**mtp_config(3, ASSISTANT_CENTROIDS), "use_local_argmax_reduction": True,
            "vllm_mtp_gemma4": {"adaptive_k": True}}
    result = run_job(Job(engine={**ENGINE, **TP2, "speculative_config": spec}, prompts=held_out_prompts[:8],
                         sampling={"temperature": 0.0, "max_tokens": 48}, env=TP2_ENV, worker_counters=True))
    assert "centroid head on, draft argmax centroid-sparse" in result.log
    assert result.token_ids == [t[:48] for t in plain_greedy.token_ids[:8]]
    assert result.spec.mean_acceptance_length > 1.5
    rank0, rank1 = result.worker_counters
    assert rank0["plans"] == rank1["plans"] > 0 and rank0["plain_steps"] == rank1["plain_steps"]
    assert rank0["step_seconds"] == rank1["step_seconds"] and rank0["step_seconds"]  # rank 0's, measured


@pytest.mark.scale  # two engines (CI's time); TP=2 local argmax with centroids stays in the default suite
def test_local_argmax_on_one_rank_with_a_dense_assistant(held_out_prompts, plain_greedy):
    """``use_local_argmax_reduction`` with an assistant without centroids: upstream asserts, the plugin drafts."""
    spec = {**SPEC, "use_local_argmax_reduction": True}
    job = Job(engine={**ENGINE, "speculative_config": spec}, prompts=held_out_prompts[:8],
              sampling={"temperature": 0.0, "max_tokens": 48})
    result = run_job(job)
    assert "draft argmax vocab-parallel local" in result.log
    assert result.token_ids == [t[:48] for t in plain_greedy.token_ids[:8]]
    assert result.spec.mean_acceptance_length > 1.5
    upstream_spec = {k: v for k, v in spec.items() if k != "vllm_mtp_gemma4"}
    with pytest.raises(JobFailed) as upstream:
        run_job(Job(engine={**ENGINE, "speculative_config": upstream_spec}, prompts=held_out_prompts[:1],
                    plugins=False))
    assert "masked_embedding is not None" in upstream.value.log


def test_tp2_seeded_sampling_matches_tp1(tp1, tp2):
    assert tp2.token_ids[8:] == tp1.token_ids[8:]


def _require_namespaces() -> None:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        pytest.skip("the Ray tests run in their own network and PID namespaces: need root, unshare, nsenter, ip")


def _ray_home() -> frozenset[Path] | None:
    """What ``~/.ray`` holds (None: no such folder)."""
    return frozenset(RAY_HOME.rglob("*")) if RAY_HOME.exists() else None


def _restore_ray_home(before: frozenset[Path] | None) -> set[Path]:
    """Remove what appeared in ``~/.ray`` since ``before``; return it."""
    new = set(_ray_home() or ()) - set(before or ())
    for path in sorted(new, reverse=True):  # files ahead of their folders
        path.rmdir() if path.is_dir() else path.unlink()
    if before is None and RAY_HOME.exists():
        RAY_HOME.rmdir()
        new.add(RAY_HOME)
    return new


def test_without_a_cluster_a_local_one_gets_a_unit_per_core(held_out_prompts):
    """No cluster to join: the engine starts a local Ray instance with one ``vllm_cpu`` per core (here too few).

    Ray's token auth stays on for it, and nothing lands in ``~/.ray``: Ray would write a token there, which turns
    token auth on for the next ``ray start --head`` on the machine. It runs ahead of the cluster tests, as in issue 18.
    """
    _require_namespaces()
    cores = len(os.sched_getaffinity(0))
    if cores >= 4:
        pytest.skip(f"{cores} cores hold TP=4")
    before = _ray_home()
    try:
        with pytest.raises(JobFailed) as failure:
            run_job(Job(engine={**ENGINE, **TP2_RAY, "tensor_parallel_size": 4, "speculative_config": SPEC},
                        prompts=held_out_prompts[:1],
                        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0|1", "RAY_ADDRESS": ""}),
                    launcher=ISOLATED, timeout=300)
    finally:
        left = _restore_ray_home(before)
    assert "Started a local Ray instance" in failure.value.log
    assert "Token authentication is enabled for this Ray cluster" in failure.value.log
    assert f"Ray cluster has {cores} free '{RAY_CPU_RESOURCE}' of the 4" in first_error(failure.value.log)
    assert not left, f"the local Ray instance left {sorted(map(str, left))}"


@pytest.fixture(scope="module")
def stale_ray_token():
    """``~/.ray/auth_token`` written as Ray writes it for a local instance, unless one is there already; yields what
    ``~/.ray`` held before."""
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    before = _ray_home()
    if not RAY_TOKEN.exists():
        generate_and_save_token()
    yield before
    _restore_ray_home(before)


@pytest.fixture(scope="module")
def ray_cluster(stale_ray_token):
    _require_namespaces()
    cluster = RayCluster({RAY_CPU_RESOURCE: 2})
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tp2_ray(held_out_prompts, ray_cluster) -> JobResult:
    prompts, sampling = _workload(held_out_prompts)
    return run_job(Job(engine={**ENGINE, **TP2_RAY, "speculative_config": SPEC}, prompts=prompts, sampling=sampling,
                       env={**TP2_ENV, **ray_cluster.env}, worker_counters=True),
                   launcher=ray_cluster.launcher, timeout=600)


def test_ray_tp2_greedy_is_token_identical_to_tp1(tp1, tp2_ray, plain_greedy):
    assert "CPURayWorkerProc" in tp2_ray.log  # the workers were Ray actors, on this plugin's CPU actor class
    assert tp2_ray.token_ids[:8] == tp1.token_ids[:8]
    assert [t[:48] for t in plain_greedy.token_ids[:8]] == tp2_ray.token_ids[:8]
    assert len(tp2_ray.worker_counters) == 2 and all(c["fused"] and c["steps"] > 0 for c in tp2_ray.worker_counters)
    assert tp2_ray.spec.num_drafts > 0


def test_ray_tp2_seeded_sampling_matches_tp1(tp1, tp2_ray):
    assert tp2_ray.token_ids[8:] == tp1.token_ids[8:]


@pytest.mark.scale  # a Ray cluster and an interpreted TP=2 engine; TP=2 on V2 with ``mp`` is in the default suite
def test_ray_tp2_on_model_runner_v2(held_out_prompts, plain_greedy, stale_ray_token):
    """TP=2 through the Ray executor on Model Runner V2 (Triton's interpreter on every node: the raylet's workers
    inherit the node's environment, not the job's): V2's workers as the plugin's CPU Ray actors, drafting by the
    local argmax, greedy as plain decoding."""
    _require_namespaces()
    cluster = RayCluster({RAY_CPU_RESOURCE: 2}, node_env=V2_ENV)
    try:
        result = run_job(Job(engine={**ENGINE, **TP2_RAY, "speculative_config": SPEC}, prompts=held_out_prompts[:4],
                             sampling={"temperature": 0.0, "max_tokens": 32}, env={**TP2_ENV, **V2_ENV, **cluster.env}),
                         launcher=cluster.launcher, timeout=900)
    finally:
        cluster.stop()
    assert "Using V2 Model Runner" in result.log and "CPURayWorkerProc" in result.log
    assert "draft argmax: vocab-parallel local" in result.log
    assert result.token_ids == [t[:32] for t in plain_greedy.token_ids[:4]]
    assert result.spec.mean_acceptance_length > 1.5


@pytest.mark.scale  # an error path of the Ray cluster (CI's time)
def test_joining_without_the_clusters_token_is_one_clear_error(held_out_prompts, ray_cluster):
    """Issue 18's engine: ``RAY_ADDRESS`` set, ``RAY_AUTH_MODE`` unset, a stale ``~/.ray/auth_token`` that is not
    the cluster's token. One error naming address, auth mode and token file; no local instance, no second error."""
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH_")}
    with pytest.raises(JobFailed) as failure:
        run_job(Job(engine={**ENGINE, **TP2_RAY, "speculative_config": SPEC}, prompts=held_out_prompts[:1],
                    # Ray retries a refused connection for 20 s; 2 tries show the same
                    env={**TP2_ENV, **env, "RAY_gcs_server_port_wait_time_s": "2"}),
                launcher=ray_cluster.launcher, timeout=300)
    assert first_error(failure.value.log).startswith(
        f"ConnectionError: Ray cluster at 127.0.0.1:{RAY_PORT} refused this engine's authentication "
        f"(RAY_AUTH_MODE unset, token {RAY_TOKEN}): ")
    assert "Started a local Ray instance" not in failure.value.log
    assert "resources must not be provided" not in failure.value.log


@pytest.mark.scale  # an error path of the Ray cluster (CI's time)
def test_more_ranks_than_the_ray_cluster_holds_fails_fast(held_out_prompts, ray_cluster):
    start = time.monotonic()
    with pytest.raises(JobFailed) as failure:
        run_job(Job(engine={**ENGINE, **TP2_RAY, "tensor_parallel_size": 4, "speculative_config": SPEC},
                    prompts=held_out_prompts[:1], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0|1", **ray_cluster.env}),
                launcher=ray_cluster.launcher, timeout=300)
    assert f"Ray cluster has 2 free '{RAY_CPU_RESOURCE}' of the 4" in first_error(str(failure.value))
    assert time.monotonic() - start < 120


def _long_generation(job: Job, launcher: list[str], outcome: dict[str, object]) -> threading.Thread:
    """``job`` generating far longer than the test waits, started in a thread; ``outcome`` gets its error log (None
    if it ended well) and when it ended."""
    job.sampling = {"temperature": 0.0, "max_tokens": 1024, "ignore_eos": True}

    def generate() -> None:
        try:
            run_job(job, launcher=launcher, timeout=600)
            outcome["error"] = None
        except JobFailed as e:
            outcome["error"] = e.log
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=generate)
    thread.start()
    return thread


def test_killed_ray_worker_fails_the_engine_promptly(held_out_prompts, ray_cluster):
    """SIGKILL one Ray worker mid-generation: the job ends with an error within FAULT_REPORT_S, nothing hangs."""
    outcome: dict[str, object] = {}
    earlier = set(ray_cluster.processes("CPURayWorkerProc"))  # an earlier job's actors Ray has not reaped yet
    job = _long_generation(Job(engine={**ENGINE, **TP2_RAY, "speculative_config": SPEC}, prompts=held_out_prompts * 2,
                               env={**TP2_ENV, **ray_cluster.env}), ray_cluster.launcher, outcome)
    deadline = time.monotonic() + 300
    busy: list[int] = []
    while len(busy) < 2 and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = [pid for pid in ray_cluster.processes("CPURayWorkerProc.run") if pid not in earlier]
    assert len(busy) == 2, f"the Ray workers never reached their busy loop (found {busy})"
    time.sleep(15)  # the engine is generating by now: 64 requests of 1,024 tokens take minutes here
    assert job.is_alive()
    os.kill(busy[-1], signal.SIGKILL)
    killed = time.monotonic()
    job.join(timeout=FAULT_REPORT_S + 30)
    assert not job.is_alive(), "the engine hung after a Ray worker died"
    assert outcome["error"] is not None
    assert re.search(r"RayWorkerProc rank=\[[01]\] died unexpectedly", outcome["error"])  # vLLM names the dead rank
    assert "EngineDeadError" in outcome["error"]
    assert outcome["ended"] - killed < FAULT_REPORT_S
    print(f"engine failed {outcome['ended'] - killed:.1f} s after the kill: {first_error(outcome['error'])}")


def test_ray_cluster_leaves_nothing_running(ray_cluster, stale_ray_token):
    ray_cluster.stop()
    assert ray_cluster.processes() == []
    planted = set() if stale_ray_token and RAY_TOKEN in stale_ray_token else {RAY_TOKEN}
    assert _restore_ray_home(stale_ray_token) - {RAY_HOME} == planted  # the Ray runs added nothing to ~/.ray
    assert _ray_home() == stale_ray_token


# The README's example: `vllm serve <model> --speculative-config mtp.json --tensor-parallel-size 2
# --distributed-executor-backend ray`, from the repository root, where the shipped mtp.json's relative draft path holds.
SHIPPED_MTP_JSON = "configs/mtp.json"
HEAD_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0"}  # each node's rank on its own core of this 2-core machine
WORKER_NODE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "1"}  # the node's own value wins over the driver's
# A node that goes silent is dead to Ray after its health checks fail: about 60 s by default (5 checks 3 s apart,
# 10 s timeout each), 10 s with these on the head (README).
RAY_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "5"}


@pytest.fixture(scope="module")
def two_nodes(stale_ray_token):
    _require_namespaces()
    nodes = TwoNodes({RAY_CPU_RESOURCE: 1}, head_env=RAY_HEALTH_CHECK, worker_env=WORKER_NODE_ENV)
    yield nodes
    nodes.stop()


def _on_head(nodes: TwoNodes) -> list[str]:
    return [*nodes.head.launcher, f"--wd={REPO}"]


def _run_measured(nodes: TwoNodes, job: Job) -> tuple[JobResult, int]:
    """``run_job`` on the head, and the bytes that crossed the veth pair while it generated.

    Engine start moves data too (the profile run's collectives), so the samples are cut to the generate() calls:
    the window of their length that ends where the job's traffic ends (shutdown after it is a few KB)."""
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), nodes.bytes()))
            done.wait(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run_job(job, launcher=_on_head(nodes), timeout=600)
    finally:
        done.set()
        sampler.join()
    busy = [t for (t, b), (_, b0) in zip(samples[1:], samples) if b - b0 > 250_000]  # > 1 MB/s
    end = busy[-1]
    at = lambda t: min(samples, key=lambda s: abs(s[0] - t))[1]  # noqa: E731
    return result, at(end) - at(end - sum(result.seconds))


@pytest.fixture(scope="module")
def tp2_two_nodes(held_out_prompts, two_nodes) -> tuple[JobResult, int]:
    prompts, sampling = _workload(held_out_prompts)
    engine = {**ENGINE, **TP2_RAY, "speculative_config": SHIPPED_MTP_JSON}
    return _run_measured(two_nodes, Job(engine=engine, prompts=prompts, sampling=sampling,
                                        env={**HEAD_ENV, **two_nodes.head.env}, worker_counters=True))


def test_two_nodes_tp2_greedy_is_token_identical_to_tp1(tp1, tp2_two_nodes, plain_greedy):
    result, _ = tp2_two_nodes
    assert result.token_ids[:8] == tp1.token_ids[:8]
    assert [t[:48] for t in plain_greedy.token_ids[:8]] == result.token_ids[:8]
    assert len(result.worker_counters) == 2 and all(c["fused"] and c["steps"] > 0 for c in result.worker_counters)
    assert "draft argmax vocab-parallel local" in result.log
    # The TP group spans the nodes: gloo over the veth pair, never shared memory (each node has its own /dev/shm).
    assert "CPU SHM communicator disabled for group tp" in result.log


def test_two_nodes_tp2_seeded_sampling_matches_tp1(tp1, tp2_two_nodes):
    assert tp2_two_nodes[0].token_ids[8:] == tp1.token_ids[8:]


def test_two_nodes_bytes_per_token(tp2_two_nodes):
    """What crosses the veth pair per generated token (README, "What the draft adds to inter-rank traffic")."""
    result, moved = tp2_two_nodes
    per_token = moved / result.generated_tokens
    print(f"TP=2 across two nodes: {moved / 1e6:.1f} MB in {sum(result.seconds):.1f} s of generation, "
          f"{result.generated_tokens} tokens, {per_token / 1e3:.1f} KB per generated token, "
          f"acceptance length {result.spec.mean_acceptance_length:.2f}")
    assert per_token > 100_000  # at least the target's logits gather crossed: the collectives ran on the veth


@pytest.mark.scale  # a third engine on the two nodes (CI's time); their TP=2 engine is in the default suite
def test_two_nodes_vllm_serve_as_the_readme_says(two_nodes, held_out_prompts, plain_greedy, tmp_path):
    """The README's command on the head node, ``vllm serve <target> --speculative-config configs/mtp.json
    --tensor-parallel-size 2 --distributed-executor-backend ray``, with the ranks on the two nodes: a completion
    asked from inside the head's network namespace is plain decoding's text."""
    port = 8000  # inside the head node's own network namespace, where nothing else listens
    log = tmp_path / "serve.log"
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(ENGINE["model"]), "--speculative-config",
               SHIPPED_MTP_JSON, "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--gpu-memory-utilization", "0.2",
               "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **HEAD_ENV, **two_nodes.head.env}
    body = json.dumps({"model": str(ENGINE["model"]), "prompt": held_out_prompts[0], "max_tokens": 64,
                       "temperature": 0})
    text = None
    with log.open("w") as out:
        server = subprocess.Popen([*_on_head(two_nodes), *command], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while text is None and time.monotonic() < deadline and server.poll() is None:
            reply = subprocess.run([*two_nodes.head.launcher, "curl", "-sf", "-H", "Content-Type: application/json",
                                    "-d", body, f"http://127.0.0.1:{port}/v1/completions"],
                                   capture_output=True, text=True)
            if reply.returncode == 0:
                text = json.loads(reply.stdout)["choices"][0]["text"]
            else:
                time.sleep(2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert text == plain_greedy.texts[0], log.read_text()[-4000:]
    assert "Gemma4MTPProposer drafting K=3" in log.read_text()


def test_two_nodes_pp2_is_refused_at_start(held_out_prompts, two_nodes):
    """PP=2 across the nodes is refused before anything starts, in one line naming the flag: the plugin's V1 runner
    does not run with pipeline parallelism (and vLLM 0.32's even split of this target would put KV-shared layer 7
    on another stage than layer 3, whose KV it reads)."""
    engine = {**ENGINE, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray",
              "speculative_config": SHIPPED_MTP_JSON}
    with pytest.raises(JobFailed) as failure:
        run_job(Job(engine=engine, prompts=held_out_prompts[:1], env={**HEAD_ENV, **two_nodes.head.env}),
                launcher=_on_head(two_nodes), timeout=300)
    refusal = "error: --pipeline-parallel-size 2: the plugin on Model Runner V1 runs without pipeline parallelism"
    assert any(line.startswith(refusal) for line in failure.value.log.splitlines()), failure.value.log[-3000:]


def test_draft_missing_on_the_worker_node_names_node_and_path(held_out_prompts, two_nodes, tmp_path):
    """The draft's directory exists on the head only: one error naming the worker node and the path."""
    hidden = tmp_path / "only-on-the-head"
    hidden.mkdir()
    subprocess.run([*two_nodes.worker.launcher, "mount", "-t", "tmpfs", "tmpfs", str(hidden)], check=True)
    (hidden / "assistant").symlink_to(ASSISTANT)
    spec = {**mtp_config(3, hidden / "assistant"), "vllm_mtp_gemma4": {}}
    with pytest.raises(JobFailed) as failure:
        run_job(Job(engine={**ENGINE, **TP2_RAY, "speculative_config": spec}, prompts=held_out_prompts[:1],
                    env={**HEAD_ENV, **two_nodes.head.env}), launcher=_on_head(two_nodes), timeout=300)
    assert (f"speculative config 'model': {hidden / 'assistant'}: directory not found on Ray node {WORKER_IP}"
            in failure.value.log), first_error(failure.value.log)


@pytest.mark.scale  # a long run (CI's time); the killed-worker test stays in the default suite
def test_lost_worker_node_fails_the_engine_promptly(held_out_prompts, two_nodes, tp1):
    """The worker node vanishes mid-generation (its link goes silent, then every process in its namespaces dies):
    the engine fails within FAULT_REPORT_S naming the lost rank or node, and a new engine starts on the head."""
    outcome: dict[str, object] = {}

    job = _long_generation(Job(engine={**ENGINE, **TP2_RAY, "speculative_config": SHIPPED_MTP_JSON},
                               prompts=held_out_prompts * 2, env={**HEAD_ENV, **two_nodes.head.env}),
                           _on_head(two_nodes), outcome)
    deadline = time.monotonic() + 300
    while not two_nodes.worker.processes("CPURayWorkerProc.run") and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert two_nodes.worker.processes("CPURayWorkerProc.run"), "the worker node's rank never reached its busy loop"
    time.sleep(10)  # generating by now
    assert job.is_alive()
    # No FIN, no RST: the link goes down first, as when a machine loses power; then its processes die.
    subprocess.run(["ip", "-n", two_nodes.netns["worker"], "link", "set", two_nodes.veth["worker"], "down"],
                   check=True)
    two_nodes.worker.stop()
    lost = time.monotonic()
    job.join(timeout=FAULT_REPORT_S + 30)
    assert not job.is_alive(), "the engine hung after the worker node was lost"
    assert outcome["error"] is not None
    error = outcome["error"]
    print(f"engine failed {outcome['ended'] - lost:.1f} s after the node was lost: {first_error(error)}")
    assert re.search(rf"rank=\[1\] died unexpectedly|{WORKER_IP}", error)
    assert outcome["ended"] - lost < FAULT_REPORT_S
    after = run_job(Job(engine={**ENGINE, "distributed_executor_backend": "ray", "speculative_config": SPEC},
                        prompts=held_out_prompts[:2], sampling={"temperature": 0.0, "max_tokens": 16},
                        env={**HEAD_ENV, **two_nodes.head.env}), launcher=_on_head(two_nodes), timeout=600)
    assert after.token_ids == [t[:16] for t in tp1.token_ids[:2]]


def test_two_nodes_leave_nothing_running(two_nodes, stale_ray_token):
    two_nodes.stop()
    assert two_nodes.left_behind() == []
    assert set(_ray_home() or ()) - set(stale_ray_token or ()) <= {RAY_TOKEN}  # at most the planted token
