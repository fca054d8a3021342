"""Where the mapped stages run: in-process threads (default) or a Dask cluster through prefect-dask.

``dask`` is ``None`` (default runner), ``"local"`` / ``"local:N"`` (a local cluster of N single-threaded worker
processes: 2 when not given, or one per visible CUDA device), or the address of an existing scheduler
(``tcp://host:8786``). With CUDA devices visible, local worker ``i`` is pinned to device ``i`` (its own
``CUDA_VISIBLE_DEVICES``, so it sees that GPU alone as ``cuda:0`` and the audit's ``device=auto`` picks it): through
dask-cuda's ``LocalCUDACluster`` when dask-cuda is installed, else
:class:`flows.dask_cluster.PinnedLocalCluster`. On a cluster of machines, start workers with ``dask cuda worker``
(or one ``dask worker`` per GPU with its own ``CUDA_VISIBLE_DEVICES``) and pass the scheduler's address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import flow

from influence_engine.errors import UserError
from tasks.options import AuditParams


def visible_devices(environ: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The CUDA devices this process may hand to workers: ``CUDA_VISIBLE_DEVICES`` when set (ids or UUIDs; empty or
    ``-1``: none), else ``0 .. count - 1`` (``count``: torch's device count when not given; 0 without CUDA)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is not None:
        ids = [d.strip() for d in raw.split(",") if d.strip()]
        return [] if not ids or ids[0] == "-1" else ids[:next((i for i, d in enumerate(ids) if d == "-1"), len(ids))]
    if count is None:
        try:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # no torch or no driver: no devices
            count = 0
    return [str(i) for i in range(count)]


def worker_envs(n_workers: int, devices: Sequence[str]) -> list[dict[str, str]]:
    """Each local worker's environment: worker ``i`` sees device ``devices[i]`` alone (as ``cuda:0``), round robin
    when there are more workers than devices; nothing is set without devices."""
    if not devices:
        return [{} for _ in range(n_workers)]
    return [{"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} for i in range(n_workers)]


def local_cluster(n: int | None, devices: Sequence[str], *, cuda_cluster_class: str | None = None
                  ) -> tuple[str | None, dict[str, Any]]:
    """The cluster class and keyword arguments of ``--dask local[:N]``: ``N`` single-threaded worker processes (2
    without devices when not given; one per visible device with them) reporting to the flow's Prefect API, worker
    ``i`` pinned to device ``i``
    (dask-cuda's ``LocalCUDACluster`` when ``cuda_cluster_class`` names it, else
    :class:`flows.dask_cluster.PinnedLocalCluster`)."""
    n = n if n is not None else (len(devices) or 2)
    kwargs: dict[str, Any] = {"n_workers": n, "threads_per_worker": 1, "dashboard_address": None}
    if not devices:
        return "flows.dask_cluster.PinnedLocalCluster", kwargs | {"processes": True, "worker_envs": worker_envs(n, [])}
    if cuda_cluster_class:
        return cuda_cluster_class, kwargs | {"CUDA_VISIBLE_DEVICES": ",".join(devices)}
    return "flows.dask_cluster.PinnedLocalCluster", kwargs | {"processes": True, "worker_envs": worker_envs(n, devices)}


def _dask_cuda() -> str | None:
    import importlib.util

    return "dask_cuda.LocalCUDACluster" if importlib.util.find_spec("dask_cuda") else None


def task_runner_for(dask: str | None, *, cluster_class: str | None = None,
                    devices: Sequence[str] | None = None) -> Any | None:
    if not dask:
        return None
    from prefect_dask import DaskTaskRunner

    if dask == "local" or dask.startswith("local:"):
        try:
            n = int(dask.split(":", 1)[1]) if ":" in dask else None
        except ValueError:
            raise UserError(f"--dask {dask!r}: use local, local:N or a scheduler address") from None
        if n is not None and n < 1:
            raise UserError(f"--dask {dask!r}: at least one worker")
        scratch = {"local_directory": os.environ.get("DASK_LOCAL_DIRECTORY") or os.path.join(
            os.environ.get("INFLUENCE_AUDIT_HOME", ".influence-audit"), "dask-scratch")}
        if cluster_class is not None:  # the user's class, as asked
            return DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs={
                "n_workers": n or 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None})
        devices = visible_devices() if devices is None else list(devices)
        cls, kwargs = local_cluster(n, devices, cuda_cluster_class=_dask_cuda())
        return DaskTaskRunner(cluster_class=cls, cluster_kwargs=kwargs | scratch)
    if "://" not in dask:
        raise UserError(f"--dask {dask!r}: use local, local:N or a scheduler address such as tcp://host:8786")
    return DaskTaskRunner(address=dask)


def run_audit(params: Any, *, dask: str | None = None, cluster_class: str | None = None) -> dict[str, Any]:
    """Run the audit flow, with its mapped stages on Dask when asked."""
    from .audit import influence_audit

    runner = task_runner_for(dask, cluster_class=cluster_class)
    flow = influence_audit if runner is None else influence_audit.with_options(task_runner=runner)
    return flow(params)


@flow(name="influence_audit_on_dask", log_prints=True)
def influence_audit_on_dask(params: AuditParams, dask: str = "local") -> dict[str, Any]:
    """The influence audit with its mapped stages on Dask (a subflow run of ``influence_audit``): the GPU work pool's
    entry point (``deploy/prefect-gpu.yaml``). ``local``: one worker per GPU the flow run's process sees
    (``CUDA_VISIBLE_DEVICES`` from the work pool's job variables), worker ``i`` pinned to device ``i``; or a
    scheduler's address."""
    return run_audit(params, dask=dask)
