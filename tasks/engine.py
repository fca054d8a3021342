"""How tasks build the engine: :class:`EngineSpec`, small and picklable, so mapped tasks on remote workers build
their own engine (cached once per process) and the input stage its tokenizer alone. Which spec an audit uses is
derived from its options (:func:`tasks.options.engine_spec`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from influence_engine import (
    InfluenceEngine,
)

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class EngineSpec:
    """How to build an engine; small and picklable for remote workers. :meth:`engine` caches one per process,
    so mapped tasks on one worker load the model once."""

    model_dir: str
    layers: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    on_long: str = "truncate"
    trust_remote_code: bool = False
    device_memory_gb: float | None = None  # for factors on the device (None: 80% of a GPU's free memory)
    fisher: str = "sampled"
    threads: int | None = None  # torch's CPU threads in the process that builds the engine (None: torch's own)

    def engine(self) -> InfluenceEngine:
        """The engine (one per process and spec); with ``threads``, torch's thread count in this process first."""
        if self.threads is not None:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
        return _engine(replace(self, threads=None))

    def tokenizer(self):  # noqa: ANN201 (a transformers tokenizer)
        """The model's tokenizer alone (no weights), cached per process: what the per-shard input stage needs."""
        return _tokenizer(self.model_dir, self.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _engine(spec: EngineSpec) -> InfluenceEngine:
    budget = None if spec.device_memory_gb is None else int(spec.device_memory_gb * 2**30)
    return InfluenceEngine.from_pretrained(spec.model_dir, layers=spec.layers, device=spec.device,
                                           precision=spec.precision, batch_size=spec.batch_size,
                                           max_length=spec.max_length, seed=spec.seed, on_long=spec.on_long,
                                           trust_remote_code=spec.trust_remote_code, device_memory_budget=budget,
                                           fisher=spec.fisher)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, trust_remote_code: bool):  # noqa: ANN202
    from transformers import AutoTokenizer

    from influence_engine.errors import ModelError, first_line
    from influence_engine.lora import base_model_dir, is_adapter_dir

    if is_adapter_dir(model_dir) and not (Path(model_dir) / "tokenizer_config.json").is_file():
        model_dir = str(base_model_dir(Path(model_dir)))  # an adapter without its own tokenizer uses its base's
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = first_line(exc)
        raise ModelError(f"--model {model_dir}: the tokenizer could not be loaded: {first[:300]}",
                         hint="save the tokenizer into the model directory") from None
