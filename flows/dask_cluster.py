"""A local Dask cluster with one environment per worker (imported by name, only when a cluster starts), whose workers
report to the flow's own Prefect API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distributed import LocalCluster


def prefect_api_env() -> dict[str, str]:
    """``PREFECT_API_URL`` of the API this process's flow run talks to: the configured one, or the temporary server
    the process started (none is configured). Without it each worker process would start a temporary server of its
    own (10-20 s each on two cores) and record its task runs there, out of the flow's sight."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return {"PREFECT_API_URL": str(url)}
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # pragma: no cover (a client-only install)
        return {}
    server = SubprocessASGIServer._instances.get(None)
    if server is not None and getattr(server, "running", False) and server.port:
        return {"PREFECT_API_URL": server.api_url}
    return {}


class PinnedLocalCluster(LocalCluster):
    """A :class:`distributed.LocalCluster` whose worker ``i`` gets ``worker_envs[i]`` on top of the cluster's
    environment (``CUDA_VISIBLE_DEVICES``: one device per worker; dask-cuda's ``LocalCUDACluster`` does the same
    when installed), and every worker the flow's Prefect API (:func:`prefect_api_env`)."""

    def __init__(self, *, worker_envs: Sequence[Mapping[str, str]], **kwargs: Any):
        api = prefect_api_env()
        self._envs = [api | dict(e) for e in worker_envs]
        kwargs.pop("n_workers", None)
        kwargs.setdefault("memory_limit", "auto")
        super().__init__(n_workers=0, **kwargs)
        self.scale(len(self._envs))
        self.sync(self._correct_state)  # starts the workers and waits until each has started

    def new_worker_spec(self) -> dict[Any, Any]:
        i = len(self.worker_spec)
        (name, spec), = super().new_worker_spec().items()
        options = dict(spec["options"])
        options["env"] = {**(options.get("env") or {}), **self._envs[i % len(self._envs)]}
        return {name: {**spec, "options": options}}
