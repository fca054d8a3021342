"""``influence-audit sync``: record in MLflow the audits that finished while MLflow was unreachable.

Registered on the main app in ``influence_audit/cli.py``; the work is in :mod:`tasks.record.sync`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from influence_audit.console import err
from influence_audit.options import Opts, takes

__all__ = ["sync"]



@takes("audit_ref", fields={"output": ("output_dir", "tracking_uri")})
def sync(experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: each audit's own)")] = None,
         opts: Opts = None) -> None:
    """Record every finished audit whose MLflow run is missing or incomplete; failed audits as failed."""
    from tasks.paths import resolve_home
    from tasks.record.sync import sync_audits

    home = resolve_home(opts.output.output_dir)
    outcomes = sync_audits(home, tracking_uri=opts.output.tracking_uri, experiment=experiment,
                           audit_id=opts.audit_ref.audit)
    for o in outcomes:
        run = f" (MLflow run {o.run_id})" if o.run_id else ""
        err.print(f"{escape(o.audit_id)}: {o.action}{run}: {escape(o.detail)}", highlight=False, soft_wrap=True)
    counts = {a: sum(o.action == a for o in outcomes) for a in ("recorded", "marked-failed", "up-to-date",
                                                                 "unfinished", "skipped")}
    err.print(f"{len(outcomes)} audit(s) in {escape(str(home))}: "
              + ", ".join(f"{n} {a}" for a, n in counts.items() if n), highlight=False, soft_wrap=True)
