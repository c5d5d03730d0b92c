"""The gateway: an OpenAI-compatible images API over the inference pipeline, with a job queue.

    POST /v1/images/generations   OpenAI Images API shape (+ Tessera fields); waits for the image, or
                                  with `Prefer: respond-async` answers 202 + a job id at once
    GET  /v1/jobs/{id}            the job (result when done); `Accept: text/event-stream` -> live progress
    GET  /v1/jobs/{id}/events     the same event stream (for EventSource)
    POST /v1/jobs/{id}/cancel
    GET  /v1/images/{id}          an image, by id only
    GET  /v1/prompts/complete?q=  auto-complete
    POST /v1/feedback             a 1-5 rating of an image
    GET  /v1/metrics              feedback, latency, throughput, usage
    GET  /healthz  /readyz        live / models loaded
    GET  /                        the web page

Every request goes through the same bounded queue (429 + Retry-After when full) and the same worker, so
behaviour under concurrency is defined: FIFO, compatible requests batched, one batch computing at a
time. No endpoint loads a model from a URL or a user path: the models are fixed when the server starts."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from importlib import resources
from typing import Callable

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.pipelines.text2image import TextToImage, batch_key
from tessera.serve.auth import bearer_token, key_id, key_matches, server_secret, stage_key
from tessera.serve.complete import Completer
from tessera.serve.limits import BodyReadTimeout
from tessera.serve.schemas import (
    Completions,
    FeedbackRequest,
    FeedbackResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    Job,
    TesseraInfo,
)
from tessera.serve.store import TERMINAL, QueueFull, Store
from tessera.serve.worker import Worker

log = logging.getLogger("tessera.serve")
ID = r"^[0-9a-f]{32}$"
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
WAIT_GRACE_S = 30.0
PUBLIC = ("/", "/favicon.ico")  # the page itself holds no data; it sends the key with every API call


@dataclasses.dataclass
class ServeConfig:
    data_dir: str = "tessera-serve"
    api_keys: tuple[str, ...] = ()       # required (Bearer) on every API route when set
    max_queue: int = 64                  # queued jobs; more -> 429
    max_batch: int = 8                   # jobs per generation batch
    max_batch_images: int = 16
    max_body_bytes: int = 64 * 1024
    deadline_s: float = 600.0            # default per-request deadline
    stage_urls: dict = dataclasses.field(default_factory=dict)  # generation / decoding / superres -> URL
    preload: tuple[str, ...] = ("diffusion",)
    models: dict = dataclasses.field(default_factory=dict)      # paradigm -> pipeline / generator folder or preset
    device: str | None = None                                   # tessera.device: cpu | cuda[:N] | auto
    dtype: str | None = None
    public_url: str | None = None                               # base of `url` links (default: relative links)
    loras: tuple[str, ...] = ()                                 # 'FILE[:SCALE]' merged into the diffusion (SD) model
    speed: dict = dataclasses.field(default_factory=dict)       # SD speed options (attention, tome, compile)


def error(status: int, message: str, code: str | None = None, param: str | None = None, headers=None, **extra):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code, **extra}},
                        status_code=status, headers=headers)


def create_app(config: ServeConfig | None = None,
               pipeline: TextToImage | Callable[[], TextToImage] | None = None) -> FastAPI:
    """`pipeline`: a built TextToImage, or a function that builds one (default: TextToImage over local
    stages, or over the stage services when config.stage_urls is set). A function is called on the
    worker thread, which then does all the torch work of this process (see serve.worker)."""
    config = config or ServeConfig()
    store = Store(config.data_dir, max_queue=config.max_queue)
    recovered = store.recover()
    if pipeline is None:
        pipeline = functools.partial(default_pipeline, dict(config.stage_urls), dict(config.models), config.device,
                                     config.dtype, stage_key(tuple(k for k in config.api_keys if k)), config.loras,
                                     config.speed)
    worker = Worker(pipeline, store, config.max_batch, config.max_batch_images, preload=config.preload)
    completer = Completer.from_vocab(store.accepted_prompts())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if recovered["requeued"] or recovered["failed"]:
            log.warning("after restart: %s", recovered)
        worker.start()
        sweeper = asyncio.create_task(_expire_queued(store))
        yield
        sweeper.cancel()
        worker.stop()

    app = FastAPI(title="Tessera images API", version="1", lifespan=lifespan,
                  description="OpenAI-compatible image generation with async jobs and live progress.")
    app.state.store, app.state.worker, app.state.config, app.state.completer = store, worker, config, completer
    _install_guards(app, config)
    _install_errors(app)
    app.add_middleware(BodyReadTimeout)
    page_html = resources.files("tessera.serve").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return page_html

    for routes in (_health_routes(store, worker), _generation_routes(config, store, worker, completer),
                   _job_routes(store, worker, completer), _data_routes(config, store, worker, completer)):
        app.include_router(routes)
    return app


def _health_routes(store: Store, worker: Worker) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz")
    def healthz():
        if not worker.alive():
            return error(503, f"the job worker is not running ({worker.warm_error or 'stopped'})", "worker_down")
        return {"status": "ok"}

    @r.get("/readyz", responses={503: {"description": "models are loading"}})
    def readyz():
        if not worker.ready:
            return error(503, worker.warm_error or "models are loading", "not_ready")
        return {"status": "ready", "models": worker.pipeline.models, "queued": store.queued()}

    return r


def _generation_routes(config: ServeConfig, store: Store, worker: Worker, completer: Completer) -> APIRouter:
    r = APIRouter()

    def retry_after(queued: int) -> int:
        return max(1, math.ceil(queued * worker.seconds_per_job() / max(1, config.max_batch // 2)))

    @r.post("/v1/images/generations", response_model=ImagesResponse,
              responses={202: {"model": Job}, 400: {}, 401: {}, 413: {}, 429: {}, 502: {}, 504: {}})
    async def generations(body: ImageGenerationRequest, request: Request):
        if worker.warm_error:
            return error(503, f"the models failed to load: {worker.warm_error}", "not_ready")
        try:
            body.to_pipeline().validate()
        except ValueError as e:
            return error(400, str(e), "invalid_request")
        deadline = time.time() + (body.deadline_seconds or config.deadline_s)
        key = batch_key(body.to_pipeline())
        try:
            job_id = store.add_job(body.model_dump_json(), json.dumps(key) if key else None, body.chosen_paradigm(),
                                   body.n, deadline, getattr(request.state, "key_id", None), retry_after)
        except QueueFull as e:
            return error(429, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)})
        worker.notify()
        if "respond-async" in request.headers.get("prefer", ""):
            return JSONResponse(_job(store.job(job_id), worker, request).model_dump(), status_code=202,
                                headers={"Location": f"/v1/jobs/{job_id}", "Preference-Applied": "respond-async"})
        row = await _wait(store, job_id, deadline + WAIT_GRACE_S)
        if row["status"] not in TERMINAL:  # the worker never finished it: say so instead of hanging
            return error(504, f"job {job_id} did not finish by its deadline; see /v1/jobs/{job_id}",
                         "deadline_exceeded", job_id=job_id)
        if row["status"] == "succeeded":
            completer.add(body.prompt, getattr(request.state, "key_id", None))
            return _render(row, request)
        return _failure(row)

    return r


def _job_routes(store: Store, worker: Worker, completer: Completer) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/jobs/{job_id}", response_model=Job, responses={404: {}})
    async def job(request: Request, job_id: str = _id_param()):
        row = _row_or_404(store, job_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(_events(store, worker, job_id, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        if row["status"] == "succeeded":
            completer.add(json.loads(row["request"])["prompt"], row["api_key"])
        return _job(row, worker, request)

    @r.get("/v1/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, 404: {}})
    async def job_events(request: Request, job_id: str = _id_param()):
        _row_or_404(store, job_id)
        return StreamingResponse(_events(store, worker, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @r.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses={404: {}, 409: {}})
    def cancel(request: Request, job_id: str = _id_param()):
        _row_or_404(store, job_id)
        if not worker.cancel(job_id):
            return error(409, f"job {job_id} has already finished", "job_finished")
        return _job(store.job(job_id), worker, request)

    return r


def _data_routes(config: ServeConfig, store: Store, worker: Worker, completer: Completer) -> APIRouter:
    """Images by id, auto-complete, feedback, metrics."""
    r = APIRouter()

    @r.get("/v1/images/{image_id}", response_class=FileResponse,
           responses={200: {"content": {m: {} for m in MEDIA.values()}}, 404: {}, 410: {}})
    def image(image_id: str = _id_param()):
        row = store.image(image_id)
        if row is None:
            raise HTTPException(404, f"image {image_id} not found")
        if not (store.images_dir / row["file"]).is_file():
            raise HTTPException(410, f"image {image_id} is no longer stored")
        return FileResponse(store.images_dir / row["file"], media_type=MEDIA[row["format"]])

    @r.get("/v1/prompts/complete", response_model=Completions)
    def complete(request: Request, q: str = Query("", max_length=200), k: int = Query(8, ge=1, le=20)):
        return Completions(q=q, suggestions=completer.suggest(q, k, getattr(request.state, "key_id", None)))

    @r.post("/v1/feedback", response_model=FeedbackResponse, responses={404: {}})
    def feedback(body: FeedbackRequest, request: Request):
        if store.image(body.image_id) is None:
            raise HTTPException(404, f"image {body.image_id} not found")
        fid = store.add_feedback(body.image_id, body.rating, body.comment, getattr(request.state, "key_id", None))
        return FeedbackResponse(id=fid, image_id=body.image_id, rating=body.rating)

    @r.get("/v1/metrics")
    def metrics(request: Request):
        usage = store.metrics(key_id=getattr(request.state, "key_id", None))
        return {**usage, "worker": {"busy_s": round(worker.busy_s, 3), "jobs": worker.jobs_done,
                                    "max_batch": config.max_batch}}

    return r


def default_pipeline(stage_urls: dict, models: dict | None = None, device: str | None = None,
                     dtype: str | None = None, api_key: str | None = None, loras: tuple[str, ...] = (),
                     speed: dict | None = None) -> TextToImage:
    """TextToImage over local stages, or over the stage services at `stage_urls` (sending `api_key`);
    `loras` merged into the diffusion model where it is generated here."""
    loras = {"diffusion": list(loras)}
    if not stage_urls:
        return TextToImage(models, device=device, dtype=dtype, loras=loras, speed=speed)
    from tessera.pipelines.text2image import LocalStages
    from tessera.serve.remote import RemoteStages
    return TextToImage(stages=RemoteStages(stage_urls, LocalStages(models, device=device, dtype=dtype, loras=loras,
                                                                   speed=speed), api_key=api_key))


LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_HEADER_BYTES = 64 * 1024   # request line + headers: a longer head is refused and the connection closed


def server_config(app, host: str, port: int):
    """uvicorn's settings for every Tessera app: bounded headers (the h11 parser; httptools has no limit);
    the request-body read timeout is each app's `BodyReadTimeout`."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", http="h11",
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def run_server(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.Server(server_config(app, host, port)).run()


STAGE_PORTS = {"gateway": 8000, "generation": 8101, "decoding": 8102, "superres": 8103}


def build_server(stage: str = "gateway", host: str = "127.0.0.1", port: int | None = None, api_keys=(),
                 models: dict | list[str] | None = None, device: str | None = None, dtype: str | None = None,
                 use_ray: bool = False, replicas: str = "1,1,1", preload: tuple[str, ...] = ("diffusion",),
                 loras: tuple[str, ...] = (), attention: str | None = None, tome: float | None = None,
                 compile: bool = False, **config) -> tuple[FastAPI, int]:
    """The app `tessera serve` runs (gateway or one stage service) and its port. A public address needs keys."""
    from tessera.errors import InvalidInputError

    if models is not None and not isinstance(models, dict):  # `--model SPEC` options: one per paradigm
        from tessera.pipelines.folder import models_by_paradigm

        models = models_by_paradigm(models)
    keys = tuple(k for arg in api_keys for k in arg.split())
    if host not in LOOPBACK and not keys:
        raise InvalidInputError(f"--host {host}: serving beyond this machine requires API keys "
                                f"(--api-key or TESSERA_API_KEYS)")
    config["stage_urls"] = {k: v for k, v in config.get("stage_urls", {}).items() if v}
    if loras and (use_ray or stage in ("decoding", "superres")):
        raise InvalidInputError(f"--lora: merged where the diffusion model generates (the gateway or the generation "
                                f"service), not {'in Ray deployments' if use_ray else 'by the ' + stage + ' service'}")
    speed = {k: v for k, v in dict(attention=attention, tome=tome, compile=compile or None).items() if v is not None}
    if stage != "gateway":
        from tessera.pipelines.text2image import LocalStages
        from tessera.serve.services import create_stage_app

        stages = LocalStages(models, device=device, dtype=dtype, loras={"diffusion": list(loras)}, speed=speed)
        app = create_stage_app(stage, stages, preload if stage != "superres" else (), api_keys=keys)
        return app, port or STAGE_PORTS[stage]
    cfg = ServeConfig(api_keys=keys, preload=preload, models=dict(models or {}), device=device, dtype=dtype,
                      loras=tuple(loras), speed=speed, **config)
    pipeline = None
    if use_ray:
        from tessera.serve.ray_app import ray_pipeline

        pipeline = ray_pipeline(*[int(r) for r in replicas.split(",")])
    return create_app(cfg, pipeline), port or STAGE_PORTS["gateway"]


def _id_param():
    from fastapi import Path
    return Path(..., pattern=ID)


def _row_or_404(store: Store, job_id: str):
    row = store.job(job_id)
    if row is None:
        raise HTTPException(404, f"job {job_id} not found")
    return row


async def _wait(store: Store, job_id: str, until: float):
    """The job once finished, or as it is at `until` (its deadline plus a grace: the worker enforces
    deadlines between sampling steps, so a live worker has finished it by then)."""
    while True:
        row = store.job(job_id)
        if row["status"] in TERMINAL or time.time() > until:
            return row
        await asyncio.sleep(0.05)


def _render(row, request: Request) -> ImagesResponse:
    req = ImageGenerationRequest.model_validate_json(row["request"])
    res = json.loads(row["result"])
    data = []
    base = (request.app.state.config.public_url or "").rstrip("/")
    for image_id in res["image_ids"]:
        path = request.app.state.store.images_dir / f"{image_id}.{req.output_format}"
        if not path.is_file():
            raise HTTPException(410, f"the images of job {row['id']} are no longer stored")
        if req.response_format == "url":  # never from the request's Host header: the configured base, or relative
            data.append(ImageData(url=f"{base}{request.app.url_path_for('image', image_id=image_id)}",
                                  revised_prompt=res["revised_prompt"]))
        else:
            data.append(ImageData(b64_json=base64.b64encode(path.read_bytes()).decode(),
                                  revised_prompt=res["revised_prompt"]))
    info = TesseraInfo(job_id=row["id"], image_ids=res["image_ids"], seed=res["seed"], paradigm=res["paradigm"],
                       model=res["model"], timings=res["timings"], withheld=res["withheld"], batch=res["batch"])
    return ImagesResponse(created=res["created"], data=data, output_format=req.output_format, size=req.size,
                          tessera=info)


def _failure(row) -> JSONResponse:
    err = json.loads(row["error"]) if row["error"] else {}
    if row["status"] == "cancelled":
        return error(409, f"job {row['id']} was cancelled", "cancelled")
    codes = {"content_policy_violation": 400, "invalid_request": 400, "deadline_exceeded": 504}
    status = codes.get(err.get("code"), 502)
    extra = {"category": err["category"]} if "category" in err else {}
    return error(status, err.get("message", "failed"), err.get("code"), err.get("param"), job_id=row["id"], **extra)


def _job(row, worker: Worker, request: Request) -> Job:
    prog = worker.progress(row["id"])
    result = _render(row, request) if row["status"] == "succeeded" else None
    return Job(id=row["id"], status=row["status"], created=row["created"], started=row["started"],
               finished=row["finished"], deadline=row["deadline"], attempts=row["attempts"],
               progress=prog,
               error=json.loads(row["error"]) if row["error"] else None, result=result)


async def _events(store: Store, worker: Worker, job_id: str, request: Request):
    """Server-Sent Events: every `progress` event of the job in order (status, stage, step, total, eta),
    then `done` with the job (its result included), then the stream ends."""
    sent, status, beat = 0, None, time.time()
    while True:
        row = store.job(job_id)
        events = worker.events.get(job_id, [])
        if row["status"] != status and not events[sent:]:
            status = row["status"]
            last = worker.progress(job_id) or {"stage": None, "step": 0, "total": 0, "eta": None}
            yield f"event: progress\ndata: {json.dumps({'status': status, **last})}\n\n"
        for ev in events[sent:]:
            yield f"event: progress\ndata: {json.dumps({'status': row['status'], **ev})}\n\n"
        sent, status = len(events), row["status"]
        if row["status"] in TERMINAL:
            yield f"event: done\ndata: {_job(row, worker, request).model_dump_json()}\n\n"
            return
        if time.time() - beat > 15:
            beat = time.time()
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.05)


async def _expire_queued(store: Store, every_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(store.expire_queued)


def _install_guards(app: FastAPI, config: ServeConfig) -> None:
    keys = tuple(k for k in config.api_keys if k)
    secret = server_secret(config.data_dir) if keys else b""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if keys and request.url.path not in PUBLIC:
            token = bearer_token(request)
            if not key_matches(token, keys):
                return error(401, "a valid API key is required: Authorization: Bearer <key>", "invalid_api_key")
            request.state.key_id = key_id(token, secret)
        if request.method in ("POST", "PUT", "PATCH"):
            n = request.headers.get("content-length")
            if n is None or not n.isdigit():
                return error(411, "a Content-Length header is required", "length_required")
            if int(n) > config.max_body_bytes:
                return error(413, f"body of {n} bytes: the limit is {config.max_body_bytes}", "body_too_large")
        return await call_next(request)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors())
        return error(400, msgs or "invalid request", "invalid_request", where)
