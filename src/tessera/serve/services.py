"""The three stage services of seed 000 Figure 16 as their own HTTP apps, so that each scales apart:

    tessera serve generation --port 8101   POST /v1/generate  JSON {paradigm, prompts, settings}
                                           -> NDJSON stream: {"step", "total"} lines, then {"params", "tensor"}
    tessera serve decoding   --port 8102   POST /v1/decode?paradigm=P  safetensors {"out"} -> {"images" uint8}
    tessera serve superres   --port 8103   POST /v1/upscale?size=N     safetensors {"images"} -> {"images"}

Each wraps the same LocalStages method the in-process gateway calls. All torch work of a service runs on
one thread (see serve.worker on why): one request computes at a time per process (the work is CPU-bound),
others wait. They bind 127.0.0.1 unless told otherwise, and beyond it require API keys (serve/auth.py)
on every route; the gateway sends its stage key."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from tessera.pipelines.base import LIMITS
from tessera.pipelines.text2image import PARADIGMS, LocalStages
from tessera.serve.auth import require_keys, stage_unauthorized
from tessera.serve.limits import BodyReadTimeout
from tessera.serve.schemas import MAX_N, MAX_PROMPT_CHARS, MAX_STEPS, SIZES, Strict
from tessera.serve.wire import images_to_tensor, pack, tensor_to_images, unpack

STAGES = ("generation", "decoding", "superres")
MAX_BATCH = 4 * MAX_N            # prompts of one generation batch
MAX_JSON = 1 << 20               # a generation request (JSON)
MAX_BODY = 64 * 2**20            # a decoding / super-resolution request: MAX_BATCH images as uint8 tensors
OCTET = "application/octet-stream"


class StageSettings(Strict):
    """The sampling settings a gateway sends, bounded by the same limits as the gateway's own requests."""
    seed: int = Field(0, ge=0, le=LIMITS.max_seed)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0, le=LIMITS.max_cfg_scale, allow_inf_nan=False)
    temperature: float | None = Field(None, gt=0, le=5, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    class_label: int | None = Field(None, ge=0, le=1 << 20)
    noise_seeds: list[tuple[int, int]] | None = Field(None, max_length=MAX_BATCH)


class GenerateRequest(Strict):
    paradigm: Literal[PARADIGMS]
    prompts: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] = Field(min_length=1, max_length=MAX_BATCH)
    settings: StageSettings = Field(default_factory=StageSettings)


class Health(BaseModel):
    status: str
    stage: str
    models: dict[str, str]


async def _body(request: Request, limit: int = MAX_BODY) -> bytes:
    n = request.headers.get("content-length")
    if n is None or not n.isdigit() or int(n) > limit:
        raise HTTPException(413 if n and n.isdigit() else 411,
                            f"body: a Content-Length up to {limit} bytes is required")
    return await request.body()


def generate_stream(stages: LocalStages, torch_thread: ThreadPoolExecutor, req: GenerateRequest):
    """Run generation on the torch thread; yield its progress and then its result as NDJSON lines."""
    q: queue.Queue = queue.Queue()

    def work():
        try:
            settings = req.settings.model_dump(exclude_none=True)
            out, params = stages.generate(req.paradigm, req.prompts, settings,
                                          lambda i, total: q.put({"step": i, "total": total}))
            q.put({"params": params, "tensor": base64.b64encode(pack({"out": out})).decode()})
        except ValueError as e:
            q.put({"error": {"type": "invalid_request", "message": str(e)}})
        except Exception as e:  # reported in the stream; the gateway fails the job visibly
            q.put({"error": {"type": "internal", "message": repr(e)}})

    torch_thread.submit(work)
    while True:
        item = q.get()
        yield json.dumps(item) + "\n"
        if "step" not in item:
            return


def create_stage_app(stage: str, stages: LocalStages | None = None, preload: tuple[str, ...] = (),
                     api_keys: tuple[str, ...] = ()) -> FastAPI:
    """One stage as its own app; with `api_keys`, every route (health included) requires one of them."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: must be one of {STAGES}")
    stages = stages or LocalStages()
    torch_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tessera-{stage}")
    state = {"ready": False}

    def warm() -> None:
        for p in preload:
            stages.loaded(p)
        state["ready"] = True

    def run(fn, *args):
        return asyncio.wrap_future(torch_thread.submit(fn, *args))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        torch_thread.submit(warm)
        yield
        torch_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"Tessera {stage} service", version="1", lifespan=lifespan)
    require_keys(app, tuple(k for k in api_keys if k), stage_unauthorized)
    app.add_middleware(BodyReadTimeout)

    @app.get("/healthz", response_model=Health)
    def healthz():
        return Health(status="ok", stage=stage, models=stages.models)

    @app.get("/readyz", response_model=Health)
    def readyz():
        if not state["ready"]:
            raise HTTPException(503, "models are loading")
        return Health(status="ready", stage=stage, models=stages.models)

    if stage == "generation":
        @app.post("/v1/generate")
        async def generate(request: Request):
            try:
                req = GenerateRequest.model_validate_json(await _body(request, MAX_JSON))
            except ValidationError as e:
                raise HTTPException(422, _first_error(e)) from None
            return StreamingResponse(generate_stream(stages, torch_thread, req), media_type="application/x-ndjson")

    if stage == "decoding":
        @app.post("/v1/decode")
        async def decode(request: Request, paradigm: Literal[PARADIGMS] = Query(...)):
            tensors, _ = _unpack_or_400(await _body(request))
            if "out" not in tensors:
                raise HTTPException(422, "body: the safetensors file needs a tensor named 'out'")
            images = await run(stages.decode, paradigm, tensors["out"])
            return Response(pack({"images": images_to_tensor(images)}), media_type=OCTET)

    if stage == "superres":
        @app.post("/v1/upscale")
        async def upscale(request: Request, size: int = Query(..., ge=64, le=int(SIZES[-1].split("x")[0]))):
            tensors, _ = _unpack_or_400(await _body(request))
            try:
                images = tensor_to_images(tensors["images"])
            except (KeyError, ValueError) as e:
                raise HTTPException(422, f"body: {e}") from e
            images = await run(stages.upscale, images, size)
            return Response(pack({"images": images_to_tensor(images)}), media_type=OCTET)

    return app


def _first_error(e: ValidationError) -> str:
    first = e.errors()[0]
    return f"{'.'.join(str(x) for x in first.get('loc', ())) or 'body'}: {first.get('msg')}"


def _unpack_or_400(data: bytes):
    try:
        return unpack(data)
    except ValueError as e:
        raise HTTPException(400, str(e)) from e
