"""aMUSEd (seed 003's Muse, open reproduction) in Tessera's own networks: a diffusers `AmusedPipeline` folder
(`model_index.json` with `transformer/`, `vqvae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) loaded strictly
into the U-ViT (generators/uvit.py), the VQ model (tokenizer/vqmodel.py) and transformers'
`CLIPTextModelWithProjection`, decoded by `sampling/masked.amused_step`.

The same seed gives the same image as diffusers' AmusedPipeline: every position starts masked; at each of
the steps the U-ViT's logits over [negative; prompt] (ONE call; the empty prompt by default) are guided,
    l = u + s (c - u)                              (only when s > 1, as diffusers)
and the step draws every masked token from softmax(l), then re-masks the least confident (Gumbel noise at
a temperature ramped from 2 to 0) along the cosine schedule. The condition: CLIP's penultimate hidden
states (no final LayerNorm) for the cross-attentions, its projected pooled embedding plus the
micro-conditions (width, height, crop, aesthetic score 6) for the AdaLN. The VQ model decodes to [0, 1].
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from tessera.checkpoint import load_strict, on_meta
from tessera.config import check_diffusers_config
from tessera.device import Placement, placement
from tessera.errors import InvalidInputError, ModelNotFoundError, WrongModelError
from tessera.nn import onednn
from tessera.pipelines.base import Pipeline, check_limits
from tessera.sampling.masked import amused_step, amused_temperatures

PIPELINES = ("AmusedPipeline",)


@dataclasses.dataclass
class AmusedSampleParams:
    """diffusers' AmusedPipeline defaults: 12 steps, guidance 10, choice temperature 2 -> 0."""

    seed: int = 0
    n: int = 1
    steps: int = 12
    cfg_scale: float = 10.0
    negative_prompt: str = ""
    temperature: float | tuple[float, float] = (2.0, 0.0)  # Gumbel temperature (start, end); t alone: (t, 0.01)
    aesthetic_score: float = 6.0
    crop: tuple[int, int] = (0, 0)                          # micro-conditioning crop (top, left)

    def validate(self) -> None:
        check_limits(self)
        temps = (self.temperature,) if isinstance(self.temperature, (int, float)) else tuple(self.temperature)
        if len(temps) not in (1, 2) or any(not 0 <= t <= 100 for t in temps):
            raise InvalidInputError(f"temperature={self.temperature}: a value or (start, end), each in [0, 100]")


class AmusedPipeline(onednn.Prepacked, Pipeline):
    paradigm = "masked"
    Params = AmusedSampleParams
    CALL_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "negative_prompt": "negative_prompt"}

    def __init__(self, transformer, vqvae, text_encoder, *, mask_id: int, schedule: str = "cosine",
                 prepack: bool = True, **kw):
        """`prepack`: on a CPU in bf16, the networks' weights prepacked for oneDNN once (nn/onednn.py)."""
        cfg = transformer.config
        if cfg.codebook_size != vqvae.codebook_size:
            raise WrongModelError(f"the U-ViT predicts {cfg.codebook_size} codes; the VQ model has {vqvae.codebook_size}")
        if cfg.encoder_hidden_size != text_encoder.dim:
            raise WrongModelError(f"the U-ViT cross-attends to {cfg.encoder_hidden_size}-d states; the text encoder "
                                  f"gives {text_encoder.dim}-d")
        if not cfg.codebook_size <= mask_id < cfg.vocab_size:
            raise WrongModelError(f"mask_token_id={mask_id}: must lie in [{cfg.codebook_size}, {cfg.vocab_size})")
        if schedule not in ("cosine", "linear"):
            raise WrongModelError(f"masking_schedule={schedule!r}: Tessera implements 'cosine' and 'linear'")
        self.mask_id, self.schedule, self.prepack = mask_id, schedule, prepack
        super().__init__(transformer, vqvae, text_encoder, **kw)

    @property
    def networks(self) -> list[torch.nn.Module]:
        """The prepacked networks. Not the VQ decoder: packed for one map size, its convolutions run 1.5-6x
        slower at the others (16x16 768-channel maps up to 256x256; benchmarks/RESULTS.md)."""
        return [self.generator, self.text_encoder.model]

    def to(self, device=None, dtype=None):
        """The weights held in the compute dtype (as Stable Diffusion's: the 600 M U-ViT is 1.2 GB in bf16),
        the VQ model channels-last; on a CPU in bf16 then prepacked for oneDNN (unless `prepack` is off)."""
        from tessera.pipelines.stable_diffusion import _vae_dtype

        with self.unpacked():
            super().to(device, dtype)
            p = self.placement
            self.generator.to(p.device, p.dtype)
            self.text_encoder.model.to(p.device, p.dtype)
            self.tokenizer.to(p.device, _vae_dtype(self.tokenizer.config, p.dtype), memory_format=torch.channels_last)
        return self

    @property
    def native_size(self) -> int:
        return self.generator.config.sample_size * self.tokenizer.factor

    def call_size(self, height: int | None, width: int | None) -> dict:
        """Any height / width the VQ factor and the U-ViT's down block divide (diffusers' rule), up to 2048."""
        return self.any_size(height, width, self.tokenizer.factor * self.generator.config.grid_factor)

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        from tessera.pipelines.stable_diffusion import clip_too_long

        return clip_too_long(self.text_encoder, prompts)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.text_encoder.encode(prompts)
        return enc.tokens.to(self.device), enc.pooled.to(self.device)  # (n, 77, D), (n, P)

    @torch.no_grad()
    def generate(self, prompts: list[str], p: AmusedSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """-> token grids [n,h,w] for images of `size` (height, width; default native). `latents`: starting
        ids [n,h,w] (mask_id where unknown) instead of all masked."""
        p.validate()
        n, f = len(prompts), self.tokenizer.factor
        height, width = size or (self.native_size, self.native_size)
        shape = (n, height // f, width // f)
        ids = torch.full(shape, self.mask_id, dtype=torch.long) if latents is None else latents.long().cpu()
        if tuple(ids.shape) != shape:
            raise InvalidInputError(f"latents: shape {tuple(ids.shape)}, expected {shape}")
        codes = self.generator.config.codebook_size
        if ((ids < 0) | ((ids >= codes) & (ids != self.mask_id))).any():
            raise InvalidInputError(f"latents: token ids must be codes in [0, {codes}) or the mask id {self.mask_id}")
        states, pooled = self._encode(prompts)
        guided = p.cfg_scale > 1.0
        if guided:
            neg_states, neg_pooled = self._encode([p.negative_prompt] * n)
            states, pooled = torch.cat([neg_states, states]), torch.cat([neg_pooled, pooled])  # (2n, ...)
        micro = torch.tensor([width, height, *p.crop, p.aesthetic_score], dtype=states.dtype, device=self.device)
        micro = micro[None].expand(states.shape[0], -1)  # (2n | n, 5)
        temps = amused_temperatures(p.steps, p.temperature)
        g = generator or torch.Generator().manual_seed(p.seed)
        with self.placement.autocast():
            cond = self.generator.prepare(states, pooled, micro)  # the same at every step: computed once
        for i in range(p.steps):
            x = (torch.cat([ids, ids]) if guided else ids).to(self.device)
            with self.placement.autocast():
                logits = self.generator(x, prepared=cond).float().cpu()  # (2n | n, hw, V)
            if guided:
                u, c = logits.chunk(2)
                logits = u + p.cfg_scale * (c - u)
            flat, _ = amused_step(logits, ids.reshape(n, -1), i, p.steps, self.mask_id, temps, g, self.schedule)
            ids = flat.view(shape)
            if callback is not None:
                callback(i + 1, p.steps)
        return ids

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids -> images [n,3,H,W] in [-1,1] (the VQ model decodes to [0, 1])."""
        with self.placement.autocast():
            x = self.tokenizer.decode_tokens(tokens.to(self.device)).float().clamp(0, 1)
        return x * 2 - 1

    def save_pretrained(self, folder, **kw):
        raise InvalidInputError("an aMUSEd pipeline is read from its diffusers folder; keep that folder "
                                "(tessera.load(DIR) reads it as it is)")


# ---- a diffusers folder -----------------------------------------------------------------------------------
def is_amused_folder(path: str | Path) -> bool:
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name") in PIPELINES and "_diffusers_version" in index


def load_transformer(folder: str | Path, variant: str | None = None, dtype: torch.dtype | None = None):
    from tessera.generators.uvit import UVit2D, UVitConfig
    from tessera.pipelines.stable_diffusion import _config, _weights

    folder = Path(folder)
    try:
        config = UVitConfig.from_diffusers(_config(folder))
    except ValueError as e:
        raise WrongModelError(f"{folder}: {e}") from None
    return load_strict(on_meta(lambda: UVit2D(config)), _weights(folder, variant, dtype), folder, dtype).eval()


def _scheduler(folder: Path) -> dict:
    try:
        config = json.loads((folder / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{folder / 'scheduler_config.json'}: {e}") from None
    if config.get("_class_name") != "AmusedScheduler":
        raise WrongModelError(f"{folder}: a {config.get('_class_name')!r} scheduler; aMUSEd's is AmusedScheduler")
    check_diffusers_config("AmusedScheduler", config, {}, {"mask_token_id", "masking_schedule"})
    return {"mask_id": int(config["mask_token_id"]), "schedule": config.get("masking_schedule", "cosine")}


def load_amused_folder(folder: str | Path, device=None, variant: str | None = None) -> AmusedPipeline:
    """A diffusers AmusedPipeline folder as a Tessera pipeline, every network strict, in the compute dtype."""
    from tessera.pipelines.stable_diffusion import load_vae, weights_file
    from tessera.text.clip import CLIPPromptEncoder

    folder = Path(folder)
    for comp in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / comp).is_dir():
            raise ModelNotFoundError(f"{folder}: the {comp}/ component is missing")
    device = device if isinstance(device, Placement) else placement(device)
    text_variant = weights_file(folder / "text_encoder", "model", variant).name.split(".")[1:-1]
    text = CLIPPromptEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", clip_skip=1, dtype=device.dtype,
                                          variant=text_variant[0] if text_variant else None, final_norm=False)
    if not hasattr(text.model, "text_projection"):
        raise WrongModelError(f"{folder / 'text_encoder'}: aMUSEd needs CLIPTextModelWithProjection (the pooled "
                              f"projection conditions the U-ViT)")
    pipe = AmusedPipeline(load_transformer(folder / "transformer", variant, device.dtype),
                          load_vae(folder / "vqvae", variant, device.dtype), text, **_scheduler(folder / "scheduler"),
                          device=device)
    pipe.source = str(folder)
    pipe.models = {"generator": {"name": str(folder / "transformer"), "kind": "amused-uvit"},
                   "tokenizer": {"name": str(folder / "vqvae"), "kind": "vqmodel"}, "text_encoder": {"name": text.name}}
    return pipe
