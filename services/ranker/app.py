"""The ranker's HTTP API. Request limits come from config/serving.yaml and appear in the OpenAPI schema.

(No `from __future__ import annotations` here: FastAPI must see the request models built from
config at app creation as real classes.)

/rank runs on the event loop although its work is blocking: it is CPU-bound and sub-millisecond
(one Redis round trip bounded by degradation.redis_timeout, then the circuit breaker skips Redis
altogether; one ONNX run), so running it there avoids a thread hand-off per request, which
measured more than the work itself. A stalled feature store costs it at most that timeout. Every
other endpoint is a `def` (thread pool): none of them may hold the loop.
"""

import gc
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError, create_model

from services.ranker import metrics
from services.ranker.candidates import CandidateStage
from services.ranker.impressions import ImpressionLog
from services.ranker.models import ModelManager, ServedModel
from services.ranker.ranking import CHALLENGER, CHAMPION, RankedFeed, Ranker
from shared.clock import AcceleratedClock, Clock
from shared.config import ServingConfig, ValidationConfig
from shared.connections import queue_redis, store_redis
from shared.features import FeatureSpec
from shared.featurestore import FeatureStore
from shared.http_guard import check_body, harden, validation_error_body
from shared.logging import configure
from shared.metrics import registry
from shared.registry import Registry
from shared.settings import Settings, get_settings

log = structlog.get_logger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long a thread may hold the GIL while another wants it (CPython's default is 5 ms)."""


class RankedItem(BaseModel):
    item_id: int
    score: float = Field(description="P(click) if shown at the top of the feed")
    position: int


class RankResponse(BaseModel):
    request_id: str
    user_id: int
    model_version: int | None = Field(description="registry version that scored the feed; null in fallback")
    variant: str = Field(description="champion, challenger, or fallback")
    feature_version: str
    degraded: bool = Field(description="true when the fallback answered (Redis unavailable, no model)")
    reason: str | None = None
    candidates: int
    items: list[RankedItem]


class PredictResponse(BaseModel):
    model_version: int | None
    variant: str
    feature_version: str
    degraded: bool
    reason: str | None = None
    scores: list[float] = Field(description="P(click) per item, in the order given")


class ErrorOut(BaseModel):
    detail: str


def request_models(api: Any, validation: ValidationConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request schemas whose limits are the configured ones: every number and list is bounded."""
    max_id = validation.max_id
    item_id = Annotated[int, Field(ge=0, le=max_id)]
    rank = create_model(
        "RankRequest",
        user_id=(int, Field(ge=0, le=max_id, examples=[17])),
        candidates=(
            list[item_id] | None,
            Field(
                default=None,
                max_length=api.max_candidates,
                description="item ids to rank; omitted = the candidate stage picks a few hundred",
                examples=[[101, 205, 333]],
            ),
        ),
        k=(int, Field(default=api.default_k, ge=1, le=api.max_k, description="feed length")),
    )
    predict = create_model(
        "PredictRequest",
        user_id=(int, Field(ge=0, le=max_id, examples=[17])),
        item_ids=(list[item_id], Field(min_length=1, max_length=api.max_candidates, examples=[[101, 205]])),
        positions=(
            list[Annotated[int, Field(ge=0, le=validation.max_position)]] | None,
            Field(
                default=None,
                max_length=api.max_candidates,
                description="slot of each item (default: the top slot)",
            ),
        ),
    )
    return rank, predict


class Components:
    """Everything the app runs; built in the lifespan so tests can reach in."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        data = settings.data_config()
        serving = settings.serving_config()
        model_config = settings.ranking_model_config()
        self.settings = settings
        self.serving = serving
        self.spec = FeatureSpec.from_config(data)
        timeout = serving.degradation.redis_timeout.total_seconds()
        self.store_conn = store_redis(settings, socket_timeout_s=timeout)
        self.queue_conn = queue_redis(settings, socket_timeout_s=1.0)
        self.clock = clock or AcceleratedClock.shared(self.queue_conn, data)
        self.store = FeatureStore(self.store_conn, data.online_store.ttl, data.online_store.superseded_ttl)
        self.models = ModelManager(
            registry=lambda: Registry(settings.mlflow_tracking_uri, model_config.registry),
            aliases=(CHAMPION, CHALLENGER),
            cache_dir=Path(settings.model_cache_dir),
            spec=self.spec,
            config=serving.models,
            on_change=self._model_changed,
        )
        pools_conn = store_redis(settings, socket_timeout_s=2.0)
        self.candidates = CandidateStage(
            pools_conn, self.clock, data.world.n_topics, serving.candidates, data.realtime
        )
        self.impressions = ImpressionLog(
            self.queue_conn,
            serving.impression_log,
            on_drop=metrics.IMPRESSIONS_DROPPED.inc,
            on_write=metrics.IMPRESSIONS_LOGGED.inc,
        )
        self.ranker = Ranker(
            self.store, self.spec, self.models, self.candidates, self.impressions, self.clock, serving
        )
        self.max_id = data.validation.max_id

    @staticmethod
    def _model_changed(alias: str, model: ServedModel | None, outcome: str) -> None:
        metrics.MODEL_RELOADS.labels(alias, outcome).inc()
        if outcome in ("loaded", "removed"):
            metrics.MODEL_VERSION.labels(alias).set(model.version if model else 0)

    def start(self) -> None:
        self.impressions.start()
        self.candidates.start()
        self.models.start()

    def stop(self) -> None:
        self.models.stop()
        self.candidates.stop()
        self.impressions.stop()


def require_admin(token: str | None, authorization: str | None) -> None:
    if not token:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "admin endpoints are disabled: no admin token set"
        )
    presented = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(presented.encode(), token.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required")


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Parse and validate a JSON body in one pydantic-core call; errors become FastAPI's usual 422."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_input=False)]
        ) from None


def readiness(
    models: dict[str, int], checked: bool, fallback_items: int, store_problem: str | None
) -> tuple[bool, dict[str, Any]]:
    """Ready means "can answer", so that a gateway keeps degraded replicas in rotation: a loaded
    model answers (from the fallback while the feature store is away); without one, the popularity
    fallback answers once the first registry check is over and its pools hold items."""
    problems = []
    if not models:
        problems.append(
            "no model loaded" if checked else "no model loaded yet (first registry check running)"
        )
    if store_problem:
        problems.append(f"feature store unreachable: {store_problem}")
    if not models and not fallback_items:
        problems.append("no fallback items (candidate pools empty)")
    ready = bool(models) or (checked and fallback_items > 0)
    status_text = "ready" if ready and not problems else "degraded" if ready else "not_ready"
    return ready, {"status": status_text, "models": models, "problems": problems}


def rank_json(parts: Components, rank_model: type[BaseModel], raw: bytes) -> bytes:
    """All of /rank without a framework: parse and validate the body in one pydantic-core call
    (same model and limits as the documented schema), rank, record metrics, serialise."""
    started = time.perf_counter()
    body = parse_body(rank_model, raw)
    feed = parts.ranker.rank(body.user_id, body.candidates, body.k)
    record_rank_metrics(feed)
    content = rank_response(feed).model_dump_json().encode()
    metrics.REQUEST_SECONDS.labels("rank", feed.variant).observe(time.perf_counter() - started)
    return content


class RankFastPath:
    """ASGI entry point: POST /rank goes straight to `rank_json`; everything else (docs, other
    endpoints, lifespan) to the FastAPI app, which also documents /rank with the same schema.

    /rank is the request the service exists for; skipping the framework's middleware, routing and
    dependency layers for it cut a measurable share of the CPU per request on this 2-core machine.
    """

    def __init__(
        self, app: FastAPI, rank_model: type[BaseModel], max_body_bytes: int, body_timeout_s: float
    ) -> None:
        self.app = app
        self.rank_model = rank_model
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # app.state, routes, ... as if this were the FastAPI app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/rank" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw = await check_body(
            scope, receive, send, self.max_body_bytes, self.body_timeout_s, untimed_first=True
        )
        if raw is None:  # answered 413/408, or the client left
            return
        try:
            content, code = rank_json(self.app.state.components, self.rank_model, raw), 200
        except RequestValidationError as exc:
            content, code = validation_error_body(exc.errors()), 422
            metrics.REQUESTS.labels("rank", "422", "none", "0").inc()
        except Exception:
            log.exception("rank_failed")
            content, code = b'{"detail":"internal error"}', 500
            metrics.REQUESTS.labels("rank", "500", "none", "0").inc()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def get_components(request: Request) -> Components:
    found: Components = request.app.state.components
    return found


ComponentsDep = Annotated[Components, Depends(get_components)]


def record_rank_metrics(feed: RankedFeed) -> None:
    for stage, seconds in feed.timings.items():
        if stage != "total":
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
    if feed.degraded:
        metrics.FALLBACKS.labels(feed.reason or "unknown").inc()
    metrics.CANDIDATES.observe(feed.candidates)
    score_hist = metrics.SCORES.labels(feed.variant)
    for score in feed.scores:
        score_hist.observe(float(score))
    metrics.REQUESTS.labels("rank", "200", feed.variant, str(feed.model_version or 0)).inc()


def rank_response(feed: RankedFeed) -> RankResponse:
    return RankResponse(
        request_id=feed.request_id,
        user_id=feed.user_id,
        model_version=feed.model_version,
        variant=feed.variant,
        feature_version=feed.feature_version,
        degraded=feed.degraded,
        reason=feed.reason,
        candidates=feed.candidates,
        items=[
            RankedItem(item_id=int(i), score=float(s), position=p)
            for p, (i, s) in enumerate(zip(feed.items, feed.scores, strict=True))
        ],
    )


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> RankFastPath:
    settings = settings or get_settings()
    serving: ServingConfig = settings.serving_config()
    data = settings.data_config()
    rank_model, predict_model = request_models(serving.api, data.validation)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure(settings.log_level, settings.log_format)
        components = Components(settings, clock)
        app.state.components = components
        components.start()
        # Everything imported and built so far lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise walk it (MLflow, pydantic, numpy...)
        # and show up as tens of milliseconds in the latency tail.
        gc.collect()
        gc.freeze()
        # Background threads (impression log, pools, model reload) must not hold the interpreter
        # for the default 5 ms while a request waits for it: hand it over every 0.5 ms instead.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        yield
        components.stop()

    app = FastAPI(
        title="feedrank ranker",
        version="1",
        summary="Ranked feeds from ONNX models and the online feature store, with A/B and fallbacks.",
        lifespan=lifespan,
    )
    body_timeout_s = data.http.body_timeout.total_seconds()
    harden(app, serving.api.max_body_bytes, body_timeout_s)

    rank_schema = rank_model.model_json_schema()

    @app.post(
        "/rank",
        response_model=RankResponse,
        responses={
            413: {"model": ErrorOut, "description": f"body larger than {serving.api.max_body_bytes} bytes"},
            422: {"description": "invalid request: the detail names each problem"},
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": rank_schema}}}
        },
    )
    async def rank(request: Request) -> Response:
        """A ranked feed for a user: top k of the given candidates, or of the candidate stage's pick."""
        content = rank_json(request.app.state.components, rank_model, await request.body())
        return Response(content, media_type="application/json")

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={413: {"model": ErrorOut}, 422: {"description": "invalid request"}},
    )
    def predict(body: predict_model, parts: ComponentsDep) -> PredictResponse:  # type: ignore[valid-type]
        """Click probabilities for the given items, in the given order."""
        started = time.perf_counter()
        positions = body.positions  # type: ignore[attr-defined]
        if positions is not None and len(positions) != len(body.item_ids):  # type: ignore[attr-defined]
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "positions must match item_ids in length"
            )
        result = parts.ranker.predict(body.user_id, body.item_ids, positions)  # type: ignore[attr-defined]
        if result.degraded and result.reason:
            metrics.FALLBACKS.labels(result.reason).inc()
        metrics.REQUESTS.labels("predict", "200", result.variant, str(result.model_version or 0)).inc()
        metrics.REQUEST_SECONDS.labels("predict", result.variant).observe(time.perf_counter() - started)
        return PredictResponse(
            model_version=result.model_version,
            variant=result.variant,
            feature_version=result.feature_version,
            degraded=result.degraded,
            reason=result.reason,
            scores=[float(s) for s in result.scores],
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers (it stays live without a model)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorOut}})
    def readyz(parts: ComponentsDep) -> dict[str, Any]:
        """Ready when the ranker can answer: 200 `ready`, or 200 `degraded` with the problems (the
        fallback answers); 503 only when there is neither a model nor a fallback."""
        store_problem = None
        try:
            parts.store_conn.ping()
        except Exception as exc:
            store_problem = str(exc) or type(exc).__name__
        pools = parts.candidates.pools
        ready, body = readiness(
            {a: m.version for a, m in parts.models.models.items()},
            parts.models.checked.is_set(),
            int(pools.trending.size + pools.fresh.size),
            store_problem,
        )
        if not ready:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "; ".join(body["problems"]))
        return body

    @app.post("/admin/reload", responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    def admin_reload(
        parts: ComponentsDep, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        """Check the registry aliases now and swap models that moved (bearer token required)."""
        require_admin(settings.admin_token, authorization)
        outcomes = parts.models.refresh()
        return {"outcomes": outcomes, "models": {a: m.version for a, m in parts.models.models.items()}}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)

    return RankFastPath(app, rank_model, serving.api.max_body_bytes, body_timeout_s)
