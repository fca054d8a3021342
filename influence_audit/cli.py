"""`influence-audit`: one entry point for every command. Thin: each command parses, calls one function in
``tasks`` (or the flow) and prints what it returns; the commands live in the ``cli_*`` modules, this one
assembles them.

User errors (bad files, flags, models, stale factors) print one line and exit non-zero, no traceback.
"""

from __future__ import annotations

import os
import sys

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines are not our progress (nor its exit flush)

from influence_audit import (  # noqa: E402  # noqa: E402
    cli_index,
    cli_influence,
    cli_models,
    cli_ops,
    cli_quality,
    cli_review,
    cli_sync,
    cli_ui,
    cli_verify,
)
from influence_audit.console import err  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Which training documents made our language model say this? EK-FAC influence audits.")
app.command("score")(cli_influence.score)
app.command("fit-factors")(cli_influence.fit_factors)
app.command("audit")(cli_influence.audit)
app.command("demo")(cli_influence.demo)
app.command("quality")(cli_quality.quality)
app.command("layers")(cli_models.layers)
app.command("plan")(cli_models.plan)
app.command("verify")(cli_verify.verify)
app.command("evaluate")(cli_verify.evaluate)
app.add_typer(cli_index.index_app, name="index")
app.add_typer(cli_review.review_app, name="review")
app.command("notify-retrained")(cli_ops.notify_retrained)
app.add_typer(cli_ops.webhook_app, name="webhook")
app.command("sync")(cli_sync.sync)
app.command("ui")(cli_ui.ui)


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, config warnings) off the user's terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Usage errors of typer's vendored click (typer >= 0.26) and of click itself."""
    import importlib

    kinds = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            kinds.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    return tuple(kinds)


def _show_usage_error(exc: Exception) -> None:
    """One line (plus a hint) for a bad flag or command; help text when no command was given."""
    from rich.markup import escape

    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        return
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    err.print(f"[bold red]error:[/] {escape(exc.format_message())}{escape(hint)}",  # type: ignore[attr-defined]
              highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: user errors print one line, no traceback, exit non-zero."""
    from rich.markup import escape

    from influence_engine.errors import UserError

    _quiet_libraries()
    interrupted = "interrupted: finished stages are kept; rerun the same command to resume"
    try:
        rc = app(standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print(interrupted)
        sys.exit(130)
    except _usage_error_types() as exc:
        _show_usage_error(exc)
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:
        import click

        if isinstance(exc, (click.exceptions.Exit, typer.Exit)):
            sys.exit(exc.exit_code)
        raise
    if isinstance(rc, int) and rc:  # typer turns Ctrl-C into exit code 130 when not standalone
        if rc == 130:
            err.print(interrupted)
        sys.exit(rc)


if __name__ == "__main__":
    main()
