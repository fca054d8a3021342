"""Operations commands: ``notify-retrained`` (for training pipelines) and ``webhook serve`` (MLflow registry).

Registered on the main app in ``influence_audit/cli.py``; imports nothing heavy until a command runs.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from influence_audit.console import err
from influence_audit.options import Opts, takes

__all__ = ["notify_retrained", "webhook_app"]

webhook_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Receive MLflow model-registry webhooks.")


@takes(fields={"model": ("model",)})
def notify_retrained(
        extra: Annotated[list[str] | None, typer.Option(
            "--extra", help="KEY=VALUE added to the event payload (repeatable)")] = None, opts: Opts = None) -> None:
    """Emit `model.retrained` so the post-retrain-audit deployment audits MODEL (needs PREFECT_API_URL)."""
    from influence_engine.errors import UserError
    from tasks.ops.events import emit_retrained

    model = opts.model.model
    payload: dict[str, str] = {}
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--extra {item!r}: expected KEY=VALUE")
        payload[key] = value
    event_id = emit_retrained(model, payload=payload)
    typer.echo(event_id)  # stdout: the id alone, for scripts
    err.print(f"model.retrained sent for {model}", highlight=False, soft_wrap=True)  # one line, the path whole


@webhook_app.command("serve")
def webhook_serve(
        host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on")] = 8765,
        secret_env: Annotated[str, typer.Option(
            "--secret-env", help="Environment variable holding the webhook's shared secret")
        ] = "INFLUENCE_AUDIT_WEBHOOK_SECRET",
        path: Annotated[str, typer.Option(help="URL path MLflow posts to")] = "/mlflow/webhook",
        max_age: Annotated[float, typer.Option(
            help="Refuse deliveries whose timestamp is further from now (seconds)")] = 300.0,
        tracking_uri: Annotated[str | None, typer.Option(
            help="MLflow server to check that a delivered version exists (default $MLFLOW_TRACKING_URI; "
                 "unset: no check)")] = None) -> None:
    """Turn signed `model_version.created` deliveries into `model.retrained` (needs PREFECT_API_URL)."""
    from influence_engine.errors import UserError
    from tasks.ops.events import _api_url
    from tasks.ops.webhook import make_server, registry_checker

    secret = os.environ.get(secret_env, "")
    if not secret:
        raise UserError(f"${secret_env} is empty: the webhook's shared secret is required",
                        hint="use the secret given to MlflowClient().create_webhook(..., secret=...)")
    api = _api_url()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(host, port, secret, path=path, max_age_s=max_age,
                         version_exists=registry_checker(uri) if uri else None)
    err.print(f"listening on http://{host}:{server.server_address[1]}{path} -> Prefect {api}"
              f"{f'; checking versions in {uri}' if uri else ''}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
