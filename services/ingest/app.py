"""ingest's HTTP API: batches of events (and catalog items) in, a validation report out.

A batch is accepted record by record: good records are stored even when others in the same
batch are bad, bad ones are quarantined with their reasons. Only a body that is not a batch at all
(not JSON, wrong shape) or that breaks a size limit is refused as a whole, with a 4xx and a reason.

A batch is named by its Idempotency-Key, or else by a hash of its body, so a retried batch is
recognised either way; a key names one body (another body under it is a 409). Work that touches
Redis or the lake runs in the thread pool, never on the event loop, so a stalled dependency slows
the requests that need it and nothing else (/healthz answers from the loop). A dependency that
fails is a 503 with Retry-After: nothing of the batch was acknowledged, and resending it is safe.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pydantic_core
import structlog
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from services.ingest.ingestion import BatchReport, Ingestor, IngestRefusedError, Kind
from shared import keys
from shared.clock import AcceleratedClock
from shared.config import DataConfig
from shared.connections import lake, queue_redis, store_redis
from shared.http_guard import harden
from shared.logging import configure
from shared.metrics import registry
from shared.schemas import EVENT_SCHEMA, EVENT_TYPES
from shared.settings import Settings, get_settings

log = structlog.get_logger(__name__)

_BATCH_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

EVENT_EXAMPLE = {
    "event_id": "r42-3-c",
    "event_type": "click",
    "user_id": 17,
    "item_id": 1234,
    "request_id": "r42",
    "position": 3,
    "ts": "2026-01-09T12:00:05Z",
    "dwell_ms": 31000,
}


class ReportOut(BaseModel):
    batch_id: str
    kind: str
    source: str
    received: int = Field(description="records in the batch")
    stored: int = Field(description="valid, new records written to the lake and the stream")
    quarantined: int = Field(description="invalid records kept in the quarantine with their reasons")
    duplicates: int = Field(description="records whose event_id was already stored")
    received_at: str
    rule_failures: dict[str, int] = Field(description="rows failing each rule (a row can fail several)")
    seconds: float


class ErrorOut(BaseModel):
    detail: str


class RejectedOut(ReportOut):
    detail: str = Field(description="why the batch was refused (every record invalid)")


def get_ingestor(request: Request) -> Ingestor:
    ingestor: Ingestor = request.app.state.ingestor
    return ingestor


IngestorDep = Annotated[Ingestor, Depends(get_ingestor)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        description="Batch id, [A-Za-z0-9_.-]{1,64}; resending a batch with the same key stores nothing "
        "twice, another body under the same key is a 409. Without a key, a hash of the body names the batch."
    ),
]


def event_schema(config: DataConfig) -> dict[str, Any]:
    """What a valid event looks like (JSON Schema, from the validation limits). Other records are
    not refused: they are quarantined with their reasons and counted in the report."""
    v = config.validation
    ident = {"type": "integer", "minimum": 0, "maximum": v.max_id}
    text = {"type": "string", "minLength": 1, "maxLength": v.max_event_id_length}
    return {
        "type": "object",
        "properties": {
            "event_id": text,
            "event_type": {"type": "string", "enum": list(EVENT_TYPES)},
            "user_id": ident,
            "item_id": ident,
            "request_id": text,
            "position": {"type": "integer", "minimum": 0, "maximum": v.max_position},
            "ts": {"anyOf": [{"type": "integer"}, {"type": "string", "format": "date-time"}]},
            "dwell_ms": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": int(v.max_dwell.total_seconds() * 1000)},
                    {"type": "null"},
                ]
            },
        },
        "required": ["event_id", "event_type", "user_id", "item_id", "request_id", "position", "ts"],
        "additionalProperties": False,
    }


def item_schema(config: DataConfig) -> dict[str, Any]:
    ident = {"type": "integer", "minimum": 0, "maximum": config.validation.max_id}
    return {
        "type": "object",
        "properties": {
            "item_id": ident,
            "creator_id": ident,
            "topic_id": ident,
            "published_at": {"anyOf": [{"type": "integer"}, {"type": "string", "format": "date-time"}]},
        },
        "required": ["item_id", "creator_id", "topic_id", "published_at"],
        "additionalProperties": False,
    }


def batch_schema(kind: Kind, record: dict[str, Any], max_records: int) -> dict[str, Any]:
    """A JSON array of records, or an object holding it under the kind's name."""
    array = {"type": "array", "items": record, "minItems": 1, "maxItems": max_records}
    wrapped = {
        "type": "object",
        "properties": {kind: array},
        "required": [kind],
        "additionalProperties": False,
    }
    return {"anyOf": [array, wrapped]}


def body_digest(body: bytes) -> str:
    """Names a batch sent without an Idempotency-Key: the same body is the same batch."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def parse_batch(ingestor: Ingestor, kind: Kind, body: bytes, batch_id: str) -> list[Any]:
    """Parse and bound a body; a body that is not a batch is quarantined whole, then refused.

    Strict JSON (pydantic-core): no NaN or Infinity, nesting at most a few hundred levels, numbers
    of at most a few thousand digits, valid UTF-8 without lone surrogates. Python's json module
    accepts all of those, and each made a 500 somewhere further down."""
    limits = ingestor.config.ingest
    try:
        document = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        ingestor.reject_body(kind, body, "invalid_json", batch_id)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    records = document.get(kind) if isinstance(document, dict) else document
    if not isinstance(records, list):
        ingestor.reject_body(kind, body, "not_a_batch", batch_id)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f'expected a JSON array of {kind} or an object {{"{kind}": [...]}}',
        )
    if not records:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "empty batch")
    if len(records) > limits.max_batch_events:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(records)} records, more than ingest.max_batch_events={limits.max_batch_events}",
        )
    return records


def unavailable(what: str, exc: Exception) -> JSONResponse:
    """A dependency failed mid-batch: nothing was acknowledged, resending the batch is safe."""
    log.warning("ingest_unavailable", what=what, error=repr(exc))
    return JSONResponse(
        {"detail": f"{what} unavailable ({exc}); nothing of the batch was acknowledged, resend it"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


def ingest_body(ingestor: Ingestor, kind: Kind, body: bytes, key: str | None) -> Response:
    """One whole request (blocking: run it in the thread pool): name, check, parse, store, report."""
    if key is not None and not _BATCH_ID.match(key):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Idempotency-Key must match [A-Za-z0-9_.-]{1,64}")
    digest = body_digest(body)
    batch_id = key or digest
    try:
        records = parse_batch(ingestor, kind, body, batch_id)
        ingestor.bind_body(kind, batch_id, digest)  # a refused body binds nothing: fix it, keep the key
        store = ingestor.events_from_records if kind == "events" else ingestor.items_from_records
        return respond(store(records, batch_id, source="http"))
    except IngestRefusedError as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)
    except RedisError as exc:
        return unavailable("Redis", exc)
    except OSError as exc:  # the lake: disk full, read-only, gone
        return unavailable("the lake", exc)


def respond(report: BatchReport) -> JSONResponse:
    """200 when anything was stored (or all were known duplicates); 422 when every record was bad,
    with a `detail` beside the report, like every other error."""
    if report.quarantined == report.received:
        detail = f"all {report.received} records are invalid (quarantined); rule_failures says why"
        return JSONResponse(
            {"detail": detail, **report.as_dict()}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
        )
    return JSONResponse(report.as_dict(), status_code=status.HTTP_200_OK)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    config = settings.data_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure(settings.log_level, settings.log_format)
        queue = queue_redis(settings)
        app.state.config = config
        app.state.ingestor = Ingestor(
            lake=lake(settings),
            queue_redis=queue,
            store_redis=store_redis(settings),
            config=config,
            clock=AcceleratedClock.shared(queue, config),
        )
        yield

    app = FastAPI(
        title="feedrank ingest",
        version="1",
        summary="Validated intake of feed events and catalog items into the lake and the event stream.",
        lifespan=lifespan,
    )

    harden(app, config.ingest.max_body_bytes, config.http.body_timeout.total_seconds())
    error_responses: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorOut, "description": "not JSON, or a bad Idempotency-Key"},
        408: {"model": ErrorOut, "description": "the body did not arrive within http.body_timeout"},
        409: {
            "model": ErrorOut,
            "description": "the Idempotency-Key was used for another body; or (with Retry-After) events "
            "of the batch are being stored by another batch right now: retry",
        },
        413: {"model": ErrorOut, "description": "too many records or too many bytes"},
        422: {"model": RejectedOut, "description": "every record invalid (all quarantined), or not a batch"},
        503: {
            "model": ErrorOut,
            "description": "Redis or the lake failed: nothing was acknowledged; resend after Retry-After",
        },
    }

    @app.post(
        "/events",
        response_model=ReportOut,
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": batch_schema(
                            "events", event_schema(config), config.ingest.max_batch_events
                        ),
                        "example": [EVENT_EXAMPLE],
                    }
                },
                "description": 'A JSON array of events (or {"events": [...]}). Fields: '
                + ", ".join(EVENT_SCHEMA.names)
                + "; ts as epoch milliseconds or ISO-8601 with a timezone; dwell_ms on clicks only.",
            }
        },
    )
    async def post_events(
        request: Request, ingestor: IngestorDep, idempotency_key: IdempotencyKey = None
    ) -> Response:
        """Validate and store a batch of events; the report says what happened to each record."""
        body = await request.body()  # bounded in size and time by BodyGuard
        return await run_in_threadpool(ingest_body, ingestor, "events", body, idempotency_key)

    @app.post(
        "/items",
        response_model=ReportOut,
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": batch_schema("items", item_schema(config), config.ingest.max_batch_events),
                        "example": [
                            {
                                "item_id": 1234,
                                "creator_id": 56,
                                "topic_id": 3,
                                "published_at": "2026-01-09T11:00:00Z",
                            }
                        ],
                    }
                },
            }
        },
    )
    async def post_items(
        request: Request, ingestor: IngestorDep, idempotency_key: IdempotencyKey = None
    ) -> Response:
        """Upsert catalog items (a re-sent item replaces the previous version)."""
        body = await request.body()
        return await run_in_threadpool(ingest_body, ingestor, "items", body, idempotency_key)

    @app.get("/reports", response_model=list[ReportOut], responses={503: {"model": ErrorOut}})
    def reports(ingestor: IngestorDep, limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> Any:
        """The most recent batch reports, newest first."""
        try:
            entries = ingestor.queue_redis.xrevrange(keys.INGEST_REPORTS, count=limit)
        except RedisError as exc:
            return unavailable("Redis", exc)
        return [json.loads(fields[b"report"]) for _, fields in entries]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (on the event loop: no dependency can hold it up)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorOut}})
    def readyz(ingestor: IngestorDep) -> dict[str, str]:
        """Readiness: both Redis instances answer and the lake is writable."""
        try:
            ingestor.queue_redis.ping()
            ingestor.store_redis.ping()
            ingestor.lake.root.mkdir(parents=True, exist_ok=True)
        except Exception as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"not ready: {exc}") from None
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)

    return app
