"""Receiver for MLflow's model-registry webhook: ``model_version.created`` -> ``model.retrained``.

MLflow (3.x, ``mlflow/webhooks/delivery.py``) POSTs JSON ``{"entity": "model_version", "action": "created",
"timestamp": ..., "data": {"name", "version", "source", "run_id", "tags", "description"}}`` with headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (unix seconds) and, when the webhook has a secret,
``X-MLflow-Signature: v1,<base64 HMAC-SHA256 over "<delivery id>.<timestamp>.<raw body>">``.

A request is acted on only if the signature matches the shared secret (constant-time compare) and the
timestamp is within ``max_age_s`` of now; anything else is answered 401 and nothing is emitted. A delivery
id already handled is answered 200 without emitting again (MLflow retries on 5xx; replays are refused by
the timestamp). When Prefect cannot be reached the answer is 503, so MLflow retries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock
from typing import Any

__all__ = ["SignatureError", "make_server", "model_uri_from_payload", "sign", "verify_signature"]

log = logging.getLogger("tasks.ops.webhook")

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
DEFAULT_PATH = "/mlflow/webhook"
MAX_BODY = 1 << 20


class SignatureError(Exception):
    """The request is not provably from MLflow: the message says why (never echoes the secret)."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature header value for a body (used by tests and by senders other than MLflow)."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, *, max_age_s: float = 300.0,
                     now: float | None = None) -> None:
    """Raise :class:`SignatureError` unless ``headers`` carry a fresh, valid MLflow signature of ``body``."""
    get = {k.lower(): v for k, v in headers.items()}.get
    delivery_id, timestamp, given = (get(DELIVERY_ID_HEADER.lower()), get(TIMESTAMP_HEADER.lower()),
                                     get(SIGNATURE_HEADER.lower()))
    if not given:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    if not delivery_id or not timestamp:
        raise SignatureError(f"missing {DELIVERY_ID_HEADER} or {TIMESTAMP_HEADER} header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not unix seconds") from None
    now = time.time() if now is None else now
    if abs(now - ts) > max_age_s:
        raise SignatureError(f"timestamp {ts} is {now - ts:+.0f} s from now (allowed +-{max_age_s:.0f} s)")
    expected = sign(secret, delivery_id, timestamp, body).encode()
    # Standard Webhooks allows several space-separated signatures (key rotation): any valid one will do.
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in given.split()):
        raise SignatureError("signature does not match the shared secret")


def model_uri_from_payload(payload: Mapping[str, Any]) -> str | None:
    """``models:/NAME/VERSION`` for a ``model_version.created`` payload; None for other events."""
    if (payload.get("entity"), payload.get("action")) != ("model_version", "created"):
        return None
    data = payload.get("data") or {}
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or version is None or not str(version).strip():
        raise ValueError("model_version.created payload without data.name and data.version")
    return f"models:/{name}/{str(version).strip()}"


class _Seen:
    """Delivery ids already acted on (bounded, oldest dropped)."""

    def __init__(self, size: int = 4096):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._ids

    def add(self, key: str) -> None:
        with self._lock:
            self._ids[key] = None
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)


Emit = Callable[..., str]
Exists = Callable[[str, str], bool]


def make_server(host: str, port: int, secret: str, *, emit: Emit | None = None, path: str = DEFAULT_PATH,
                max_age_s: float = 300.0, version_exists: Exists | None = None) -> ThreadingHTTPServer:
    """An HTTP server that turns signed ``model_version.created`` deliveries into ``model.retrained``.

    ``emit(model, payload=...)`` defaults to :func:`tasks.ops.events.emit_retrained`. ``version_exists(name,
    version)``, when given, filters out deliveries for versions the registry does not have (MLflow's "test
    webhook" button sends an example payload for ``example_model`` version 1): they are answered 200, ignored.
    """
    if not secret:
        raise ValueError("an empty webhook secret would accept anything")
    if emit is None:
        from tasks.ops.events import emit_retrained as emit
    seen = _Seen()

    class Handler(BaseHTTPRequestHandler):
        server_version = "influence-audit-webhook"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
            log.info("%s %s", self.address_string(), format % args)

        def _reply(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] != path:
                self._reply(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"error": "body too large"})
                return
            body = self.rfile.read(length)
            try:
                verify_signature(secret, dict(self.headers.items()), body, max_age_s=max_age_s)
            except SignatureError as exc:
                log.warning("refused delivery from %s: %s", self.address_string(), exc)
                self._reply(401, {"error": f"refused: {exc}"})
                return
            delivery_id = self.headers[DELIVERY_ID_HEADER]
            if delivery_id in seen:
                self._reply(200, {"status": "duplicate", "delivery_id": delivery_id})
                return
            try:
                payload = json.loads(body)
                uri = model_uri_from_payload(payload)
            except ValueError as exc:
                self._reply(400, {"error": f"bad payload: {exc}"})
                return
            if uri is None:
                self._reply(200, {"status": "ignored", "reason": "not model_version.created"})
                return
            data = payload["data"]
            if version_exists is not None and not version_exists(data["name"], str(data["version"])):
                self._reply(200, {"status": "ignored", "reason": f"{uri} is not in the registry"})
                return
            extra = {"source": "mlflow-webhook", "delivery_id": delivery_id, "registered_model": data["name"],
                     "version": str(data["version"]), "run_id": data.get("run_id"),
                     "artifact_source": data.get("source")}
            try:
                event_id = emit(uri, payload=extra)
            except Exception as exc:  # Prefect down: 503 makes MLflow retry
                log.error("could not emit model.retrained for %s: %s", uri, exc)
                self._reply(503, {"error": f"could not emit model.retrained: {exc}"})
                return
            seen.add(delivery_id)
            log.info("model.retrained %s for %s (delivery %s)", event_id, uri, delivery_id)
            self._reply(200, {"status": "emitted", "event_id": event_id, "model": uri})

    return ThreadingHTTPServer((host, port), Handler)


def registry_checker(tracking_uri: str) -> Exists:
    """``version_exists`` against the MLflow registry at ``tracking_uri`` (errors other than 'not found'
    count as existing, so a flaky registry never drops a real delivery)."""
    from tasks.record.tracker import tracker

    t = tracker(tracking_uri)

    def exists(name: str, version: str) -> bool:
        try:
            return t.model_version_exists(name, version)
        except Exception:  # a flaky registry (unreachable, refused): never drop a real delivery
            return True

    return exists
