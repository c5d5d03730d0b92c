"""Request / response models of the HTTP API: the OpenAI Images API shape plus Tessera's extension fields.
Every limit is here, so the OpenAPI spec states it and validation names the field that broke it; every
request the models accept is one the pipeline accepts (tests/test_serve.py checks that with hypothesis)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tessera.pipelines.text2image import DEFAULT_MODELS, LIMITS, Request

SIZES = ("128x128", "256x256", "512x512", "1024x1024", "2048x2048")
MAX_PROMPT_CHARS = 1000
MAX_N, MAX_STEPS = LIMITS.max_n, LIMITS.max_steps  # the pipeline's limits: one source of truth
MAX_DEADLINE_S = 3600.0
MODEL_NAMES = {**{p: p for p in DEFAULT_MODELS}, **{m: p for p, m in DEFAULT_MODELS.items()}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageGenerationRequest(Strict):
    """POST /v1/images/generations. OpenAI fields first, then Tessera's extensions (sent by the openai
    client through `extra_body`)."""
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description=f"a paradigm or its default model: {sorted(MODEL_NAMES)}")
    n: int = Field(1, ge=1, le=MAX_N)
    size: Literal[SIZES] = "1024x1024"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = Field(None, max_length=256)
    # extensions
    paradigm: Literal["ar", "masked", "diffusion"] | None = None
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(-1, ge=-1, le=LIMITS.max_seed)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0, le=LIMITS.max_cfg_scale, allow_inf_nan=False)
    class_label: int | None = Field(None, ge=0, le=1 << 20, description="class-conditional models (LlamaGen)")
    enhance: bool = True
    diversify: bool = False
    deadline_seconds: float | None = Field(None, ge=1, le=MAX_DEADLINE_S, allow_inf_nan=False)

    def chosen_paradigm(self) -> str:
        """`paradigm` wins; else `model` names a paradigm or its default model; else diffusion."""
        if self.paradigm:
            if self.model and MODEL_NAMES.get(self.model) != self.paradigm:
                raise ValueError(f"model={self.model!r} does not match paradigm={self.paradigm!r}")
            return self.paradigm
        if self.model is None:
            return "diffusion"
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model={self.model!r}: must be one of {sorted(MODEL_NAMES)}")
        return MODEL_NAMES[self.model]

    def to_pipeline(self) -> Request:
        """The pipeline request; a field the paradigm does not take (steps for ar, negative_prompt for ar /
        masked) is kept, so that `Request.validate` rejects it by name as the CLI does."""
        paradigm = self.chosen_paradigm()
        return Request(prompt=self.prompt, paradigm=paradigm, size=int(self.size.split("x")[0]), n=self.n,
                       seed=self.seed, steps=self.steps, cfg_scale=self.cfg_scale,
                       negative_prompt=self.negative_prompt, enhance=self.enhance, diversify=self.diversify,
                       class_label=self.class_label)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str


class Withheld(BaseModel):
    index: int
    category: str | None
    score: float


class TesseraInfo(BaseModel):
    job_id: str
    image_ids: list[str]
    seed: int
    paradigm: str
    model: str
    timings: dict[str, float]
    withheld: list[Withheld]
    batch: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    tessera: TesseraInfo


class Progress(BaseModel):
    stage: str | None = None
    step: int = 0
    total: int = 0
    eta: float | None = None


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: float
    started: float | None = None
    finished: float | None = None
    deadline: float | None = None
    attempts: int = 0
    progress: Progress | None = None
    error: dict | None = None
    result: ImagesResponse | None = None


class FeedbackRequest(Strict):
    image_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    rating: int = Field(ge=1, le=5, description="1 (bad) to 5 (good)")
    comment: str = Field("", max_length=1000)


class FeedbackResponse(BaseModel):
    id: int
    image_id: str
    rating: int


class Completions(BaseModel):
    q: str
    suggestions: list[str]
