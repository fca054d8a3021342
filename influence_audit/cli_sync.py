"""``influence-audit sync``: record in MLflow the audits that finished while MLflow was unreachable.

Registered on the main app in ``influence_audit/cli.py``; the work is in :mod:`tasks.sync`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["sync"]

err = Console(stderr=True)


def sync(output_dir: Annotated[Path | None, typer.Option(
             help="Where the audits are (default: $INFLUENCE_AUDIT_HOME or ./.influence-audit)")] = None,
         tracking_uri: Annotated[str | None, typer.Option(
             help="MLflow URI (default: each audit's own, else $MLFLOW_TRACKING_URI, else sqlite in --output-dir)")
         ] = None,
         experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: each audit's own)")] = None,
         audit_id: Annotated[str | None, typer.Option("--audit-id", help="Sync only this audit")] = None) -> None:
    """Record every finished audit whose MLflow run is missing or incomplete; failed audits as failed."""
    from tasks.paths import resolve_home
    from tasks.sync import sync_audits

    home = resolve_home(output_dir)
    outcomes = sync_audits(home, tracking_uri=tracking_uri, experiment=experiment, audit_id=audit_id)
    for o in outcomes:
        run = f" (MLflow run {o.run_id})" if o.run_id else ""
        err.print(f"{escape(o.audit_id)}: {o.action}{run}: {escape(o.detail)}", highlight=False, soft_wrap=True)
    counts = {a: sum(o.action == a for o in outcomes) for a in ("recorded", "marked-failed", "up-to-date",
                                                                 "unfinished", "skipped")}
    err.print(f"{len(outcomes)} audit(s) in {escape(str(home))}: "
              + ", ".join(f"{n} {a}" for a, n in counts.items() if n), highlight=False, soft_wrap=True)
