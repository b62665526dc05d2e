"""ingest's HTTP API: batches of events (and catalog items) in, a validation report out.

A batch is accepted record by record: good records are stored even when others in the same
batch are bad, bad ones are quarantined with their reasons. Only a body that is not a batch at all
(not JSON, wrong shape) or that breaks a size limit is refused as a whole, with a 4xx and a reason.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from services.ingest.ingestion import BatchReport, Ingestor, Kind
from shared import keys
from shared.clock import AcceleratedClock
from shared.config import DataConfig
from shared.connections import lake, queue_redis, store_redis
from shared.logging import configure
from shared.metrics import registry
from shared.schemas import EVENT_SCHEMA
from shared.settings import Settings, get_settings

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


def get_ingestor(request: Request) -> Ingestor:
    ingestor: Ingestor = request.app.state.ingestor
    return ingestor


def get_config(request: Request) -> DataConfig:
    config: DataConfig = request.app.state.config
    return config


IngestorDep = Annotated[Ingestor, Depends(get_ingestor)]
ConfigDep = Annotated[DataConfig, Depends(get_config)]
IdempotencyKey = Annotated[
    str | None,
    Header(description="Batch id; resending a batch with the same key stores nothing twice."),
]


async def read_batch(
    request: Request, ingestor: Ingestor, kind: Kind, key: str | None
) -> tuple[str, list[Any]]:
    """Read, bound and parse a body; a body that is not a batch is quarantined whole, then refused."""
    limits = ingestor.config.ingest
    batch_id = key or uuid.uuid4().hex
    if not _BATCH_ID.match(batch_id):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Idempotency-Key must match [A-Za-z0-9_.-]{1,64}")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limits.max_body_bytes:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"body larger than ingest.max_body_bytes={limits.max_body_bytes}; split the batch",
            )
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
    return batch_id, records


def respond(report: BatchReport) -> JSONResponse:
    """200 when anything was stored (or all were known duplicates); 422 when every record was bad."""
    code = (
        status.HTTP_422_UNPROCESSABLE_CONTENT if report.quarantined == report.received else status.HTTP_200_OK
    )
    return JSONResponse(report.as_dict(), status_code=code)


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

    error_responses: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorOut, "description": "not JSON, or a bad Idempotency-Key"},
        413: {"model": ErrorOut, "description": "too many records or too many bytes"},
        422: {"model": ReportOut, "description": "every record invalid (all quarantined), or not a batch"},
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
                        "schema": {"type": "array", "items": {"type": "object"}},
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
        batch_id, records = await read_batch(request, ingestor, "events", idempotency_key)
        return respond(ingestor.events_from_records(records, batch_id, source="http"))

    @app.post(
        "/items",
        response_model=ReportOut,
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "array", "items": {"type": "object"}},
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
        batch_id, records = await read_batch(request, ingestor, "items", idempotency_key)
        return respond(ingestor.items_from_records(records, batch_id, source="http"))

    @app.get("/reports", response_model=list[ReportOut])
    def reports(ingestor: IngestorDep, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent batch reports, newest first."""
        entries = ingestor.queue_redis.xrevrange(keys.INGEST_REPORTS, count=max(1, min(limit, 1000)))
        return [json.loads(fields[b"report"]) for _, fields in entries]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
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
