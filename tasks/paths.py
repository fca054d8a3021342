"""Where things live: one place resolves the project home, an audit's directory and the factor cache.

The home is ``--output-dir`` (or ``--home``), else ``$INFLUENCE_AUDIT_HOME``, else ``./.influence-audit``, always
made absolute (manifests record absolute paths). Under it: ``audits/<audit id>/``, ``factors/<settings key>/``,
the default MLflow store ``mlflow.db`` + ``mlartifacts/`` (:func:`tasks.record.tracker.configure_tracking`) and
``flagged_documents.parquet``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings module loads torch: a review pull or `review list` needs none of it
    from influence_engine import FactorSettings

HOME_ENV = "INFLUENCE_AUDIT_HOME"
DEFAULT_HOME = ".influence-audit"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home``, else ``$INFLUENCE_AUDIT_HOME``, else ``./.influence-audit``, as an absolute path."""
    return Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def audit_dir(home: Path, audit_id: str) -> Path:
    return home / "audits" / audit_id


def factor_dir(home: Path, settings: FactorSettings) -> Path:
    """The factor cache for these settings (model and data fingerprints included)."""
    return home / "factors" / settings.key()
