"""Where the mapped stages run: in-process threads (default) or a Dask cluster through prefect-dask.

``dask`` is ``None`` (default runner), ``"local"`` / ``"local:N"`` (a local cluster of N single-threaded worker
processes), or the address of an existing scheduler (``tcp://host:8786``). On GPU workers, start the cluster with
dask-cuda (``dask cuda worker``, or ``--dask-cluster-class dask_cuda.LocalCUDACluster``) so each worker sees its
own GPU as ``cuda:0``; the audit's ``device=auto`` then picks it.
"""

from __future__ import annotations

import os
from typing import Any

from influence_engine.errors import UserError


def task_runner_for(dask: str | None, *, cluster_class: str | None = None) -> Any | None:
    if not dask:
        return None
    from prefect_dask import DaskTaskRunner

    if dask == "local" or dask.startswith("local:"):
        try:
            n = int(dask.split(":", 1)[1]) if ":" in dask else 2
        except ValueError:
            raise UserError(f"--dask {dask!r}: use local, local:N or a scheduler address") from None
        kwargs: dict[str, Any] = {"n_workers": n, "threads_per_worker": 1, "processes": True,
                                  "dashboard_address": None}
        if cluster_class is None:
            kwargs["local_directory"] = os.environ.get("DASK_LOCAL_DIRECTORY") or os.path.join(
                os.environ.get("INFLUENCE_AUDIT_HOME", ".influence-audit"), "dask-scratch")
        return DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kwargs) if cluster_class else \
            DaskTaskRunner(cluster_kwargs=kwargs)
    if "://" not in dask:
        raise UserError(f"--dask {dask!r}: use local, local:N or a scheduler address such as tcp://host:8786")
    return DaskTaskRunner(address=dask)


def run_audit(params: Any, *, dask: str | None = None, cluster_class: str | None = None) -> dict[str, Any]:
    """Run the audit flow, with its mapped stages on Dask when asked."""
    from .audit import influence_audit

    runner = task_runner_for(dask, cluster_class=cluster_class)
    flow = influence_audit if runner is None else influence_audit.with_options(task_runner=runner)
    return flow(params)
