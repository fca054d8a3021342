"""--dask local[:N] with CUDA devices: worker i is pinned to device i (checked without a GPU: the pinning is a function
of the visible devices, and a real local cluster started with it gives each worker its own CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import os

import pytest

from flows.runners import local_cluster, task_runner_for, visible_devices, worker_envs
from influence_engine import UserError


def test_visible_devices_come_from_the_environment_or_the_device_count():
    assert visible_devices({}, count=0) == []
    assert visible_devices({}, count=3) == ["0", "1", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "4,6"}, count=8) == ["4", "6"]  # what this process was given
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-a1b2, GPU-c3d4"}) == ["GPU-a1b2", "GPU-c3d4"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}, count=2) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}, count=2) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1,-1,0"}) == ["1"]  # CUDA stops at the first invalid id


def test_worker_i_is_pinned_to_device_i():
    assert worker_envs(2, []) == [{}, {}]
    assert worker_envs(2, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert worker_envs(3, ["4", "6"]) == [{"CUDA_VISIBLE_DEVICES": d} for d in ("4", "6", "4")]  # round robin
    cls, kw = local_cluster(None, [])
    assert cls == "flows.dask_cluster.PinnedLocalCluster" and kw["worker_envs"] == [{}, {}]
    assert kw["n_workers"] == 2 and kw["threads_per_worker"] == 1
    cls, kw = local_cluster(None, [str(i) for i in range(8)])  # local: one worker per visible device
    assert cls == "flows.dask_cluster.PinnedLocalCluster" and kw["n_workers"] == 8
    assert [e["CUDA_VISIBLE_DEVICES"] for e in kw["worker_envs"]] == [str(i) for i in range(8)]
    cls, kw = local_cluster(2, ["0", "1", "2", "3"], cuda_cluster_class="dask_cuda.LocalCUDACluster")
    assert cls == "dask_cuda.LocalCUDACluster" and kw["n_workers"] == 2 and kw["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_task_runner_pins_local_workers_when_devices_are_visible(monkeypatch):
    monkeypatch.setattr("flows.runners._dask_cuda", lambda: None)
    r = task_runner_for("local:2", devices=["3", "5"])
    assert r.cluster_class == "flows.dask_cluster.PinnedLocalCluster"
    assert r.cluster_kwargs["worker_envs"] == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    r = task_runner_for("local", devices=[])
    assert r.cluster_kwargs["worker_envs"] == [{}, {}] and r.cluster_kwargs["n_workers"] == 2
    with pytest.raises(UserError, match="at least one worker"):
        task_runner_for("local:0", devices=[])


@pytest.mark.slow
def test_pinned_local_cluster_gives_each_worker_its_own_device(tmp_path):
    from distributed import Client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.dask_cluster import PinnedLocalCluster

    envs = worker_envs(2, ["0", "1"])
    # the flow's API, handed to every worker: set as Prefect's own setting (inside a test session the settings
    # context, not the environment, is what an earlier test's Prefect left behind)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4321/api"}), \
            PinnedLocalCluster(worker_envs=envs, threads_per_worker=1, processes=True, dashboard_address=None,
                               local_directory=str(tmp_path)) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)  # on a busy machine the client can connect before both register
        seen = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS"),
                                   os.environ.get("PREFECT_API_URL")))
        assert sorted(v[0] for v in seen.values()) == ["0", "1"]
        assert {v[1:] for v in seen.values()} == {("1", "http://127.0.0.1:4321/api")}  # one thread per worker
        names = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
        assert sorted(names) == [0, 1]
