"""A local Dask cluster with one environment per worker (imported by name, only when a cluster starts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distributed import LocalCluster


class PinnedLocalCluster(LocalCluster):
    """A :class:`distributed.LocalCluster` whose worker ``i`` gets ``worker_envs[i]`` on top of the cluster's
    environment (``CUDA_VISIBLE_DEVICES``: one device per worker); dask-cuda's ``LocalCUDACluster`` does the same
    when installed."""

    def __init__(self, *, worker_envs: Sequence[Mapping[str, str]], **kwargs: Any):
        self._envs = [dict(e) for e in worker_envs]
        kwargs.pop("n_workers", None)
        kwargs.setdefault("memory_limit", "auto")
        super().__init__(n_workers=0, **kwargs)
        self.scale(len(self._envs))
        self.sync(self._wait_all)

    async def _wait_all(self) -> None:
        await self._correct_state()
        if self.scheduler_comm is not None:
            await self.scheduler_comm.wait_for_workers(n_workers=len(self._envs))

    def new_worker_spec(self) -> dict[Any, Any]:
        i = len(self.worker_spec)
        (name, spec), = super().new_worker_spec().items()
        options = dict(spec["options"])
        options["env"] = {**(options.get("env") or {}), **self._envs[i % len(self._envs)]}
        return {name: {**spec, "options": options}}
