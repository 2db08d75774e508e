"""The scale-out topology for real on one host: PostgreSQL, a multi-node Ray cluster on 127.0.0.1 (`ray start`
processes, one per node), and `koala serve` whose job drivers join that cluster through RAY_ADDRESS.

- trials spread over the nodes, and each records the node that ran it;
- a node killed mid-trial: Tune retries the trial from its last checkpoint on the node that is left, and the job
  still ends with every planned trial exactly once;
- fractional GPUs: with 2 (logical) GPUs and `gpu: 0.5` per trial, four trials run at once, never more, and a
  trial on a machine whose torch sees no CUDA runs on the CPU and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from service.testing import LoopbackCluster, RayNode
from tests.helpers import Factory, assert_each_planned_trial_once, tiny_spec, wait_for, wait_until

pytestmark = pytest.mark.slow
# Epochs long enough (0.4-1 s each on one core) that trials overlap and can be interrupted, few enough to be quick.
QUADRATIC = {"workload": "noisy-quadratic", "workload_config": {"dimension": 100, "samples_per_epoch": 32768}}


@pytest.fixture
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster() as ray_cluster:
        yield ray_cluster
    assert ray_cluster.leftover_pids() == set(), "Ray processes survived the cluster"


@pytest.fixture
def two_nodes(cluster: LoopbackCluster) -> tuple[RayNode, RayNode]:
    head = cluster.add_node("a", num_cpus=1, resources={"node_a": 1})
    worker = cluster.add_node("b", num_cpus=1, resources={"node_b": 1})
    return head, worker


def trials_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/trials").json()  # type: ignore[no-any-return]


def test_trials_run_on_both_nodes_and_record_them(
    postgres_url: str, cluster: LoopbackCluster, two_nodes: tuple[RayNode, RayNode], server_factory: Factory
) -> None:
    head, worker = two_nodes
    server = server_factory(database_url=postgres_url, env=cluster.env)
    # One CPU per trial, two at once, one CPU per node: the two running trials are on different nodes.
    spec = tiny_spec(
        seeds=4, max_concurrent_trials=2, resources={"cpu": 1}, optimizers=[{"name": "sgd", "params": {"lr": 0.1}}]
    )
    with server.client() as client:
        assert client.get("/readyz").json()["ray"] == f"reachable at {cluster.address}"
        job = client.post("/v1/jobs", json=spec).json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["state"] == "succeeded", done
        trials = trials_of(client, job["id"])
    assert len(trials) == 4
    assert all(t["state"] == "complete" and t["device"] == "cpu" for t in trials)
    assert {t["node"] for t in trials} == {head.node_id, worker.node_id}
    assert_each_planned_trial_once(postgres_url, job["id"], spec)


def test_a_node_killed_mid_trial_is_survived(
    postgres_url: str, cluster: LoopbackCluster, two_nodes: tuple[RayNode, RayNode], server_factory: Factory
) -> None:
    head, worker = two_nodes
    server = server_factory(database_url=postgres_url, env=cluster.env)
    epochs = 10
    spec = {
        **QUADRATIC,
        "name": "node loss",
        "epochs": epochs,
        "seeds": 3,
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
        "optimizers": [{"name": "sgd", "params": {"lr": 0.01}}],
    }
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        # Two trials past their first epoch (so each has a checkpoint): with one CPU per node, one of them runs on
        # the worker node.
        wait_until(
            lambda: sum(t["state"] == "running" and t["epochs_done"] >= 1 for t in trials_of(client, job["id"])) >= 2,
            240,
            "two trials did not get past their first epoch at once",
        )
        cluster.kill(worker)
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["state"] == "succeeded", done
        trials = trials_of(client, job["id"])
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert all(t["epochs_done"] == epochs for t in trials)
    assert all(sorted(int(epoch) for epoch in t["metrics"]) == list(range(1, epochs + 1)) for t in trials)
    # The trial the worker node was running finished on the head, the only node left.
    assert {t["node"] for t in trials} == {head.node_id}
    # Ray marks a node dead once its heartbeats have been missing for a while.
    wait_until(
        lambda: [node["NodeID"] for node in cluster.describe()] == [head.node_id],
        90,
        f"Ray still lists the killed worker node {worker.node_id}",
        interval=2,
    )
    assert_each_planned_trial_once(postgres_url, job["id"], spec)


def max_concurrency(trials: list[dict[str, Any]], slack: float = 0.25) -> int:
    """How many trials trained at the same moment, at most. A trial trained over [finished - wall_seconds,
    finished]; each interval is narrowed by `slack` seconds at both ends, for the lag between a trial's end and
    the driver recording it."""
    moments: list[tuple[float, int]] = []
    for trial in trials:
        finished = datetime.fromisoformat(trial["finished_at"]).timestamp()
        moments += [(finished - trial["wall_seconds"] + slack, 1), (finished - slack, -1)]
    running = most = 0
    for _, change in sorted(moments):  # at equal times an end (-1) sorts before a start (+1)
        running += change
        most = max(most, running)
    return most


def test_fractional_gpus_run_four_trials_at_once(
    postgres_url: str, cluster: LoopbackCluster, server_factory: Factory
) -> None:
    import torch

    # Two logical GPUs; CPUs are plentiful (8 x 0.25 of the 4 declared), so the GPUs are what limits concurrency.
    head = cluster.add_node("gpu", num_cpus=4, num_gpus=2)
    server = server_factory(database_url=postgres_url, env=cluster.env)
    spec = {
        **QUADRATIC,
        "name": "half a GPU each",
        "epochs": 3,
        "seeds": 8,
        "max_concurrent_trials": 8,
        "resources": {"cpu": 0.25, "gpu": 0.5},
        "optimizers": [{"name": "sgd", "params": {"lr": 0.01}}],
    }
    with server.client() as client:
        job = client.post("/v1/jobs", json=spec).json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=400)
        assert done["state"] == "succeeded", done
        trials = trials_of(client, job["id"])
    assert len(trials) == 8
    assert max_concurrency(trials) == 4
    assert {t["node"] for t in trials} == {head.node_id}
    if not torch.cuda.is_available():  # the logical GPUs are not real: every trial fell back to the CPU
        assert {t["device"] for t in trials} == {"cpu"}
    assert_each_planned_trial_once(postgres_url, job["id"], spec)
