"""The ``model.retrained`` event: how training pipelines (and the MLflow webhook receiver) tell Prefect that a
model changed. The ``post-retrain-audit`` deployment in ``prefect.yaml`` triggers on it and takes the model
from ``event.payload.model`` (a local directory or an MLflow ``models:/`` / ``runs:/`` URI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from influence_engine.errors import UserError
from tasks.ops.model_uri import is_model_uri

__all__ = ["RETRAINED_EVENT", "emit_retrained", "normalise_model", "retrained_event"]

RETRAINED_EVENT = "model.retrained"


def normalise_model(model: str) -> str:
    """MLflow URIs as given; a local model directory as an absolute path (workers run elsewhere)."""
    model = model.strip()
    if is_model_uri(model):
        return model
    path = Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise UserError(f"model {model!r}: not a Hugging Face model directory (no config.json)",
                        hint="give the save_pretrained directory, or models:/NAME/VERSION")
    return str(path)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("no Prefect server configured: cannot emit model.retrained",
                        hint="set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    return str(url)


async def _send(event: Any) -> None:
    from prefect.events.clients import get_events_client

    async with get_events_client(reconnection_attempts=2) as client:
        await client.emit(event)


def retrained_event(model: str, *, payload: dict[str, Any] | None = None) -> Any:
    """The ``model.retrained`` event for ``model``: resource ``model.<model>``, the model also in the payload
    (where the ``post-retrain-audit`` trigger reads it)."""
    from prefect.events import Event

    model = normalise_model(model)
    return Event(event=RETRAINED_EVENT,
                 resource={"prefect.resource.id": f"model.{model}", "prefect.resource.name": model},
                 payload={**(payload or {}), "model": model})


def emit_retrained(model: str, *, payload: dict[str, Any] | None = None) -> str:
    """Send ``model.retrained`` for ``model`` to the Prefect server at ``PREFECT_API_URL``; return its id.

    Unlike ``prefect.events.emit_event`` (fire and forget, errors only logged) this waits until the server
    has the event and raises :class:`UserError` when it cannot be delivered.
    """
    from prefect.utilities.asyncutils import run_coro_as_sync

    url = _api_url()
    event = retrained_event(model, payload=payload)
    try:
        run_coro_as_sync(_send(event))
    except Exception as exc:
        raise UserError(f"could not send {RETRAINED_EVENT} to Prefect at {url}: {type(exc).__name__}: {exc}",
                        hint="is the Prefect server running and PREFECT_API_URL right?") from None
    return str(event.id)
