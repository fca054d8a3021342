"""``influence-audit ui``: the exact MLflow UI addresses of an audit's run and traces (where reviewers mark
culprits), and the command that serves the UI for a local store. Registered in ``influence_audit/cli.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

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


def ui(audit_id: Annotated[str | None, typer.Argument(help="Audit id (default: the newest finished audit)")] = None,
       home: Annotated[Path | None, typer.Option(
           "--output-dir", "--home", help="Where the audits are (default $INFLUENCE_AUDIT_HOME or ./.influence-audit)")
       ] = None,
       tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: the audit's)")]
       = None,
       port: Annotated[int, typer.Option(help="Port of the local UI (sqlite stores)")] = 5000,
       queries: Annotated[bool, typer.Option("--queries", help="Also one address per query's trace")] = False,
       serve: Annotated[bool, typer.Option("--serve", help="Then run the UI here (local stores)")] = False) -> None:
    """Print the MLflow UI addresses of an audit's run and traces, and how to serve the UI."""
    from tasks.ui import audit_ui

    info = audit_ui(home, audit_id, tracking_uri=tracking_uri, port=port, per_query=queries)
    print_ui(info)
    if serve and info["command"]:
        import shlex

        argv = shlex.split(info["command"])
        os.execv(argv[0], argv)
