"""What a model's layer presets track, and what a run on it will need: read from its config alone (built on the
meta device: no weights are loaded, so an 8B-parameter model is described in seconds)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_engine.errors import UserError
from tasks.options import DataOptions, FactorOptions, ModelOptions, QueryOptions, RuntimeOptions, fields_of


@dataclass
class LayerTable:
    """Per preset, the layers it tracks (``None``: the preset tracks nothing on this model)."""

    model: str
    model_class: str
    model_type: str
    auto: str
    presets: dict[str, list[Any] | None] = field(default_factory=dict)

    def weights(self, preset: str) -> int:
        return sum(s.out_features * s.a_dim for s in self.presets[preset] or [])

    def lines(self, preset: str, names: bool) -> list[str]:
        """One line per layer, or per pattern (layers whose names differ only in block or expert numbers)."""
        specs = self.presets[preset] or []
        if names:
            return [f"  {s.name}  {s.kind} {s.out_features} x {s.in_features}{' + bias' if s.bias else ''}"
                    for s in specs]
        groups: dict[tuple, int] = defaultdict(int)
        for s in specs:
            groups[(re.sub(r"\.\d+(?=\.|$)", ".N", s.name), s.kind, s.out_features, s.in_features, s.bias)] += 1
        return [f"  {name}  x{count}  {kind} {o} x {i}{' + bias' if bias else ''}"
                for (name, kind, o, i, bias), count in groups.items()]


def layer_table(model: ModelOptions) -> LayerTable:
    """What each preset (mlp, attention, all, lora) tracks on this model."""
    from influence_engine.layers import layer_spec, select_layers
    from influence_engine.plan import meta_model
    from influence_engine.presets import PRESETS, resolve_layers
    from tasks.inputs.preflight import resolve_model

    m = meta_model(Path(resolve_model(model.model)), trust_remote_code=model.trust_remote_code)
    table = LayerTable(model.model, type(m).__name__, getattr(m.config, "model_type", "?"), resolve_layers(m, "auto"))
    for preset in PRESETS:
        try:
            table.presets[preset] = [layer_spec(n, mod) for n, mod in
                                     select_layers(m, resolve_layers(m, preset)).items()]
        except UserError:
            table.presets[preset] = None
    return table


def memory_plan(model: ModelOptions, factors: FactorOptions, runtime: RuntimeOptions, data: DataOptions | None,
                queries: QueryOptions, *, per_layer: int = 8) -> Any:
    """The memory each stage needs (factors per layer and in total, on device and host; a batch; the gradient
    cache) and the tokens to process: an :class:`influence_engine.plan.Plan` (``lines()``, ``too_large()``)."""
    import torch

    from influence_engine.plan import groups_within, plan_for
    from tasks.inputs.preflight import resolve_model

    model_dir = Path(resolve_model(model.model))
    docs = tokens = None
    if data is not None:
        docs, tokens = _count_tokens(model_dir, data, factors.max_length, model.trust_remote_code)
    n_queries = 32
    if queries.queries:
        from tasks.inputs.sources import read_rows

        n_queries = read_rows(queries.queries, "queries").height
    budget = None if runtime.device_memory_gb is None else int(runtime.device_memory_gb * 2**30)
    p = plan_for(model_dir, factors.layers, trust_remote_code=model.trust_remote_code, strategy=factors.strategy,
                 precision=factors.precision, batch_size=runtime.batch_size, max_length=factors.max_length,
                 queries=n_queries, query_rank=queries.query_rank, docs=docs, tokens=tokens, device_budget=budget)
    if budget is None and torch.cuda.is_available():  # as the engine will see it once the model is loaded
        from influence_engine.engine import GPU_FACTOR_SHARE

        free, _ = torch.cuda.mem_get_info()
        p.device_budget = int(GPU_FACTOR_SHARE * max(0, free - p.model_bytes))
        p.groups = groups_within([(m.name, max(m.covariance_device, m.lambda_device)) for m in p.layers],
                                 p.device_budget)
    return p


def _count_tokens(model: Path, data: DataOptions, max_length: int, trust_remote_code: bool) -> tuple[int, int]:
    """Documents and tokens (after truncation to ``max_length``) of the training data."""
    from transformers import AutoTokenizer

    from influence_engine.data import encode
    from influence_engine.lora import base_model_dir, is_adapter_dir
    from tasks.inputs.rows import rows_of
    from tasks.inputs.sources import read_rows

    source = model if not is_adapter_dir(model) or (model / "tokenizer_config.json").is_file() else base_model_dir(
        model)
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    rows = rows_of(read_rows(data.train, "train", fields=fields_of(data), split=data.split))
    examples = encode(tok, rows, max_length=max_length, on_long="truncate")
    return len(examples), sum(len(e.input_ids) for e in examples)
