"""``influence-audit ui``: the exact MLflow UI addresses of an audit's run and traces (where reviewers mark
culprits), and the command that serves the UI for a local store. Registered in ``influence_audit/cli.py``."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from influence_audit.options import Opts, audit_id_of, takes

__all__ = ["print_ui", "ui"]


def print_ui(info: dict[str, Any]) -> None:
    """One address per line, never wrapped (a wrapped URL cannot be clicked or pasted)."""
    aid = info["audit_id"]
    if info["command"]:
        typer.echo(f"Serve the MLflow UI (leave it running): {info['command']}")
    typer.echo(f"Review audit {aid} (its traces: open one, select a candidate's span, add feedback "
               f"'culprit'): {info['urls']['traces']}")
    typer.echo(f"The audit's MLflow run (metrics, report.html, candidates.json): {info['urls']['run']}")
    for qid, url in (info["urls"].get("trace") or {}).items():
        typer.echo(f"  query {qid}: {url}")
    typer.echo(f"Then record the marks: influence-audit review pull {aid}")


@takes("audit_ref", fields={"output": ("output_dir", "tracking_uri")})
def ui(audit_id: Annotated[str | None, typer.Argument(help="Audit id (default: the newest finished audit)")] = None,
       port: Annotated[int, typer.Option(help="Port of the local UI (sqlite stores)")] = 5000,
       queries: Annotated[bool, typer.Option("--queries", help="Also one address per query's trace")] = False,
       serve: Annotated[bool, typer.Option("--serve", help="Then run the UI here (local stores)")] = False,
       opts: Opts = None) -> None:
    """Print the MLflow UI addresses of an audit's run and traces, and how to serve the UI."""
    from tasks.record.ui import audit_ui

    audit_id = audit_id_of(audit_id, opts, required=False)
    info = audit_ui(opts.output.output_dir, audit_id, tracking_uri=opts.output.tracking_uri, port=port,
                    per_query=queries)
    print_ui(info)
    if serve and info["command"]:
        import shlex

        argv = shlex.split(info["command"])
        typer.echo("starting the MLflow UI (it answers after 20-40 s here; Ctrl-C stops it)...", err=True)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # the server's library warnings
        os.execv(argv[0], argv)
