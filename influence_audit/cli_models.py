"""`influence-audit layers` and `influence-audit plan`: what a model's presets track, and what a run will need.

Both read only the model's config (and an adapter's ``adapter_config.json``); the work is in
:mod:`tasks.inputs.models`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from influence_audit.console import err, out
from influence_audit.options import Opts, takes

__all__ = ["layers", "plan"]


@takes("model")
def layers(names: Annotated[bool, typer.Option("--names", help="List every layer, not one line per pattern")] = False,
           opts: Opts = None) -> None:
    """Print what each preset (mlp, attention, all, lora) tracks on this model, with shapes (out x in)."""
    from tasks.inputs.models import layer_table

    t = layer_table(opts.model)
    out.print(f"{t.model}: {t.model_class} ({t.model_type}); default --layers auto = {t.auto}", soft_wrap=True,
              highlight=False)
    for preset, specs in t.presets.items():
        if specs is None:
            out.print(f"[bold]{preset}[/]: nothing", soft_wrap=True)
            continue
        out.print(f"[bold]{preset}[/]: {len(specs)} layers, {t.weights(preset):,} weights", soft_wrap=True)
        for line in t.lines(preset, names):
            out.print(line, highlight=False, soft_wrap=True)


@takes("model", "factors", "runtime", fields={"data": ("train", "split", "id_field", "text_field"),
                                               "queries": ("queries", "query_rank")}, optional=("train",))
def plan(per_layer: Annotated[int, typer.Option(help="Largest layers to list")] = 8, opts: Opts = None) -> None:
    """Print the memory each stage needs (factors per layer and in total, on device and host; a batch; the
    gradient cache) and the tokens to process, before anything runs (--train counts the data's tokens, --queries
    the queries to prepare; 32 without it)."""
    from tasks.inputs.models import memory_plan

    p = memory_plan(opts.model, opts.factors, opts.runtime, opts.data, opts.queries, per_layer=per_layer)
    for line in p.lines(per_layer):
        out.print(line, highlight=False, soft_wrap=True)
    if p.too_large():
        err.print(f"[bold red]{len(p.too_large())} layer(s) cannot fit the device: audit and score will refuse[/]")
        raise typer.Exit(1)
