"""`influence-audit layers` and `influence-audit plan`: what a model's presets track, and what a run will need.

Both read only the model's config (and an adapter's ``adapter_config.json``): the model is built on the meta
device, so no weights are loaded and an 8B-parameter model is described in seconds.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from influence_audit.cli import LayersOpt, ModelOpt, StrategyOpt, err, out


def _specs(model, layers: str) -> dict:
    from influence_engine.layers import layer_spec, select_layers
    from influence_engine.presets import resolve_layers

    return {n: layer_spec(n, m) for n, m in select_layers(model, resolve_layers(model, layers)).items()}


def _grouped(specs: dict) -> list[str]:
    """Layers whose names differ only in block or expert numbers, on one line each with their count."""
    groups: dict[tuple, int] = defaultdict(int)
    for s in specs.values():
        groups[(re.sub(r"\.\d+(?=\.|$)", ".N", s.name), s.kind, s.out_features, s.in_features, s.bias)] += 1
    return [f"  {name}  x{count}  {kind} {o} x {i}{' + bias' if bias else ''}"
            for (name, kind, o, i, bias), count in groups.items()]


def layers(model: ModelOpt,
           names: Annotated[bool, typer.Option("--names", help="List every layer, not one line per pattern")] = False,
           trust_remote_code: bool = False) -> None:
    """Print what each preset (mlp, attention, all, lora) tracks on this model, with shapes (out x in)."""
    from influence_engine.errors import UserError
    from influence_engine.plan import meta_model
    from influence_engine.presets import PRESETS, resolve_layers

    m = meta_model(model, trust_remote_code=trust_remote_code)
    out.print(f"{model}: {type(m).__name__} ({getattr(m.config, 'model_type', '?')}); default --layers auto = "
              f"{resolve_layers(m, 'auto')}", soft_wrap=True)
    for preset in PRESETS:
        try:
            specs = _specs(m, preset)
        except UserError:
            out.print(f"[bold]{preset}[/]: nothing", soft_wrap=True)
            continue
        params = sum(s.out_features * s.a_dim for s in specs.values())
        out.print(f"[bold]{preset}[/]: {len(specs)} layers, {params:,} weights", soft_wrap=True)
        for line in ([f"  {s.name}  {s.kind} {s.out_features} x {s.in_features}{' + bias' if s.bias else ''}"
                      for s in specs.values()] if names else _grouped(specs)):
            out.print(line, highlight=False, soft_wrap=True)


def plan(model: ModelOpt, layers: LayersOpt = "auto", strategy: StrategyOpt = "ekfac",
         train: Annotated[list[Path] | None, typer.Option("--train", help="Training data, to count its tokens")] = None,
         precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp64")] = "fp32",
         batch_size: int = 8, max_length: int = 512,
         queries: Annotated[int, typer.Option(help="Queries to prepare")] = 32, query_rank: int = 32,
         device_memory_gb: Annotated[float | None, typer.Option(
             help="Device memory for factors in GiB (default: 80% of the GPU's free memory less the model, "
                  "if there is a GPU)")] = None,
         per_layer: Annotated[int, typer.Option(help="Largest layers to list")] = 8,
         trust_remote_code: bool = False) -> None:
    """Print the memory each stage needs (factors per layer and in total, on device and host; a batch; the
    gradient cache) and the tokens to process, before anything runs."""
    import torch

    from influence_engine.errors import UserError
    from influence_engine.plan import groups_within, plan_for

    if precision not in ("fp32", "bf16", "fp64"):
        raise UserError(f"--precision {precision!r}: choose one of fp32, fp64, bf16")
    docs = tokens = None
    if train:
        docs, tokens = _count_tokens(model, train, max_length, trust_remote_code)
    budget = None
    if device_memory_gb is not None:
        budget = int(device_memory_gb * 2**30)
    p = plan_for(model, layers, trust_remote_code=trust_remote_code, strategy=strategy, precision=precision,
                 batch_size=batch_size, max_length=max_length, queries=queries, query_rank=query_rank, docs=docs,
                 tokens=tokens, device_budget=budget)
    if budget is None and torch.cuda.is_available():  # as the engine will see it once the model is loaded
        from influence_engine.engine import GPU_FACTOR_SHARE

        free, _ = torch.cuda.mem_get_info()
        p.device_budget = int(GPU_FACTOR_SHARE * max(0, free - p.model_bytes))
        p.groups = groups_within([(m.name, max(m.covariance_device, m.lambda_device)) for m in p.layers],
                                 p.device_budget)
    for line in p.lines(per_layer):
        out.print(line, highlight=False, soft_wrap=True)
    if p.too_large():
        err.print(f"[bold red]{len(p.too_large())} layer(s) cannot fit the device: audit and score will refuse[/]")
        raise typer.Exit(1)


def _count_tokens(model: Path, train: list[Path], max_length: int, trust_remote_code: bool) -> tuple[int, int]:
    """Documents and tokens (after truncation to ``max_length``) of the training data."""
    from transformers import AutoTokenizer

    from influence_engine.data import encode
    from influence_engine.lora import base_model_dir, is_adapter_dir
    from tasks.data import read_rows
    from tasks.engine_io import rows_of

    source = model if not is_adapter_dir(model) or (model / "tokenizer_config.json").is_file() else base_model_dir(
        model)
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    examples = encode(tok, rows_of(read_rows(train, "train")), max_length=max_length, on_long="truncate")
    return len(examples), sum(len(e.input_ids) for e in examples)
