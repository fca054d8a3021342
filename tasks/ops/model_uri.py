"""Models from MLflow: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest`` and
``runs:/RUN_ID/PATH`` resolve to a local Hugging Face model directory.

Downloads go to ``$INFLUENCE_AUDIT_HOME/model-cache/<uri>-<hash>/`` (default home ``./.influence-audit``),
written to a temporary directory first and renamed into place, so a killed download never leaves a half
model behind and concurrent audits of the same version share one copy. Aliases and ``latest`` are
resolved to a version number first (they move; a version does not), so the cache is never stale.

How a training pipeline registers a model (the artifact is the plain ``save_pretrained`` directory)::

    with mlflow.start_run() as run:
        mlflow.log_artifacts(model_dir, "model")
    register_model_dir(...)  # or, by hand:
    MlflowClient().create_model_version(NAME, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

(``mlflow.register_model("runs:/<run>/model", NAME)`` refuses plain artifacts in MLflow 3: it wants an
``MLmodel`` file or a logged model, hence ``create_model_version``.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from influence_engine.atomic import umask_mode
from influence_engine.errors import UserError

__all__ = ["is_model_uri", "model_cache_dir", "register_model_dir", "resolve_model_uri"]

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9A-Za-z_-]+)(?:/(?P<path>.*))?$")
_HINT = "check the URI and that MLFLOW_TRACKING_URI points at the MLflow server holding the model"


def is_model_uri(model: str) -> bool:
    """True for the MLflow URIs this module resolves."""
    return model.startswith(("models:/", "runs:/"))


def model_cache_dir() -> Path:
    """``$INFLUENCE_AUDIT_HOME/model-cache`` (default ``./.influence-audit/model-cache``)."""
    home = os.environ.get("INFLUENCE_AUDIT_HOME") or ".influence-audit"
    return Path(home).expanduser().resolve() / "model-cache"


def _pinned(uri: str) -> str:
    """The same model with a fixed version: aliases, ``latest`` and stages become ``models:/NAME/N``."""
    m = _MODELS.match(uri)
    if m is None:
        if _RUNS.match(uri) is None:
            raise UserError(f"model {uri!r}: not a models:/NAME/VERSION, models:/NAME@ALIAS or "
                            "runs:/RUN_ID/PATH URI")
        return uri.rstrip("/")
    name, version, alias = m["name"], m["version"], m["alias"]
    if version is not None and version.isdigit():
        return f"models:/{name}/{int(version)}"
    if version is not None and version.startswith("m-"):
        return uri  # MLflow 3 logged-model id: immutable
    from tasks.record.tracker import tracker

    t = tracker()
    if alias is not None:
        return f"models:/{name}/{t.model_version_by_alias(name, alias)}"
    if version is not None and version.lower() == "latest":
        versions = t.model_versions(name)
        if not versions:
            raise UserError(f"model {uri!r}: registered model {name!r} has no versions", hint=_HINT)
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    latest = t.latest_versions(name, version)  # legacy stage names (Production, Staging)
    if not latest:
        raise UserError(f"model {uri!r}: no version of {name!r} in stage {version!r}", hint=_HINT)
    return f"models:/{name}/{latest[0].version}"


def _cache_name(uri: str, tracking_uri: str) -> str:
    digest = hashlib.sha256(f"{tracking_uri}\n{uri}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^0-9A-Za-z._-]+", "_", uri).strip("_")[:80]
    return f"{readable}-{digest}"


def _model_root(directory: Path) -> Path | None:
    """``directory`` if it holds ``config.json``, else its one subdirectory that does (e.g. ``model/``)."""
    if (directory / "config.json").is_file():
        return directory
    found = [d for d in sorted(directory.iterdir()) if d.is_dir() and (d / "config.json").is_file()]
    return found[0] if len(found) == 1 else None


def resolve_model_uri(uri: str) -> str:
    """Download (once) the model behind an MLflow URI; return the local directory holding ``config.json``."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from tasks.record.tracker import mlflow_error, tracker

    t = tracker()
    tracking_uri = t.uri
    try:
        pinned = _pinned(uri.strip())
        cache = model_cache_dir()
        final = cache / _cache_name(pinned, tracking_uri)
        if final.is_dir() and (root := _model_root(final)) is not None:
            return str(root)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        tmp.chmod(umask_mode(0o777))  # mkdtemp's 0700 would hide the cached model from other accounts
        try:
            t.download_artifacts(pinned, tmp)
            if _model_root(tmp) is None:
                raise UserError(f"model {uri!r}: no config.json in the artifact (nor one level down)",
                                hint="log the save_pretrained directory: "
                                     "mlflow.log_artifacts(model_dir, 'model')")
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same download first: use theirs
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise UserError(f"model {uri!r}: could not download from {tracking_uri}: {exc}", hint=_HINT) from None
    except Exception as exc:
        if (message := mlflow_error(exc)) is None:
            raise
        raise UserError(f"model {uri!r}: {message}", hint=_HINT) from None
    root = _model_root(final)
    if root is None:
        raise UserError(f"model {uri!r}: cached copy {final} has no config.json; delete it and retry")
    return str(root)


def register_model_dir(model_dir: str | os.PathLike[str], name: str, *,
                       tags: dict[str, str] | None = None) -> str:
    """Log a ``save_pretrained`` directory as artifacts of a new run and register it as a new version of
    ``name`` (created if missing); returns ``models:/NAME/VERSION``. Uses the current MLflow tracking URI."""
    from tasks.record.tracker import tracker

    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"model {str(model_dir)!r}: no config.json", hint="give a save_pretrained directory")
    version = tracker().register_model_dir(model_dir, name, tags=tags)
    return f"models:/{name}/{version}"
