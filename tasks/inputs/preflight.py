"""The preflight: an audit's inputs checked in seconds, before Prefect or MLflow start (the model directory or URI,
the first rows and columns of every training source, the queries, the planted file, a writable output directory),
so bad input gets one line and a non-zero exit before any long work.
"""

from __future__ import annotations

import os
from pathlib import Path

from influence_engine import FactorSettings, UserError
from tasks.engine import EngineSpec
from tasks.inputs.sources import read_rows
from tasks.options import AuditParams, engine_spec, fields_of
from tasks.paths import resolve_home


def resolve_model(model: str) -> str:
    """A local directory for the model (``models:/`` and ``runs:/`` URIs are fetched from MLflow, ``.gguf`` files
    converted once)."""
    if model.startswith(("models:/", "runs:/")):
        from tasks.ops.model_uri import resolve_model_uri

        return resolve_model_uri(model)
    from influence_engine.gguf import is_gguf
    from influence_engine.models import check_model_dir

    if is_gguf(model) and not Path(model).expanduser().is_dir():
        return str(resolve_gguf(model))
    return str(check_model_dir(Path(model).expanduser()).resolve())


def resolve_gguf(path: str) -> Path:
    """The Hugging Face directory for a ``.gguf`` file: converted once (dequantised to float32) into
    ``$INFLUENCE_AUDIT_HOME/model-cache/gguf-<name>-<sha256>/`` (as MLflow models are), reused after."""
    import sys

    from influence_engine.gguf import convert_gguf
    from tasks.ops.model_uri import model_cache_dir

    return convert_gguf(path, model_cache_dir(), log=lambda m: print(m, file=sys.stderr, flush=True))


def check_writable(directory: Path, what: str) -> None:
    """Refuse a directory that cannot be created or written, before any work; ``what`` names the flag and the
    path the user gave (e.g. ``--out x/y.parquet``)."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what}: {probe} is a file, not a directory", hint="choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {probe} is not writable", hint="choose a directory you can write")


def preflight(p: AuditParams) -> None:
    """Check the audit's inputs in seconds, before Prefect or MLflow start: the model directory, that the
    training sources exist and their first rows have the columns they need, the queries, the planted file, the
    output directory."""
    if not p.model.startswith(("models:/", "runs:/")):
        resolve_model(p.model)
    for path in p.checkpoint:
        if p.use_index or p.prefilter or p.mode == "quality":
            what = "--use-index" if p.use_index else "--prefilter" if p.prefilter else "--mode quality"
            raise UserError(f"--checkpoint with {what}: not supported (every checkpoint scores every document)",
                            hint="leave out one of the two")
        if not path.startswith(("models:/", "runs:/")):
            try:
                resolve_model(path)
            except UserError as exc:
                raise UserError(f"--checkpoint {path}: {str(exc).split(': ', 1)[-1]}") from None
    from tasks.inputs.sources import check_columns

    check_columns(p.train, "train", fields=fields_of(p), split=p.split)
    if p.queries:  # none in quality mode
        read_rows(p.queries, "queries")
    if p.device_memory_gb is not None and not p.model.startswith(("models:/", "runs:/")):
        from influence_engine.plan import plan_for  # from the config alone: refuse a layer that cannot fit, now

        plan_for(resolve_model(p.model), p.layers, trust_remote_code=p.trust_remote_code, precision=p.precision,
                 device_budget=int(p.device_memory_gb * 2**30)).check()
    if p.planted and not Path(p.planted).is_file():
        raise UserError(f"--planted {p.planted}: no such file", hint="give a JSON file {query_id: [train ids]}")
    check_writable(resolve_home(p.output_dir), f"--output-dir {resolve_home(p.output_dir)}")


def checkpoint_specs(p: AuditParams, settings: FactorSettings) -> list[tuple[EngineSpec, FactorSettings]]:
    """Each ``--checkpoint``'s engine spec and factor settings (the audit's, with the checkpoint's own weights'
    fingerprint); refused with the gradient index or a prefilter, which score a subset of the documents."""
    if p.use_index or p.prefilter:
        raise UserError(f"--checkpoint with {'--use-index' if p.use_index else '--prefilter'}: not supported "
                        f"(every checkpoint scores every document)", hint="leave out one of the two")
    out = []
    for path in p.checkpoint:
        spec = engine_spec(p, resolve_model(path))
        out.append((spec, settings.replace(model_fingerprint=spec.engine().fingerprint)))
    return out
