"""Stable Diffusion in Tessera's own networks: a diffusers pipeline folder (`model_index.json` with
`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) loaded strictly into `SDUNet`, the `kl` or
`taesd` autoencoder and transformers' CLIP, and sampled by `sampling/solvers.py`.

The same seed gives the same image as diffusers' StableDiffusionPipeline: x_T = randn(1, 4, h, w) * the
scheduler's initial sigma from the caller's generator, then the scheduler's steps over
    eps = u + s (c - u)    (classifier-free guidance only when s > 1, as diffusers; u from the negative
                            prompt, "" by default, c from the prompt; ONE U-Net call over [u; c])
and the VAE decodes x_0 / scaling_factor + shift_factor (tests/test_stable_diffusion.py).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tessera.checkpoint import load_strict, on_meta
from tessera.device import Placement, placement
from tessera.errors import InvalidInputError, ModelNotFoundError, WrongModelError
from tessera.generators.sd_unet import guidance_embedding
from tessera.nn import onednn
from tessera.pipelines.base import Pipeline
from tessera.pipelines.diffusion import DiffusionSampleParams, initial_noise
from tessera.sampling.diffusion import DiffusionConfig, Schedule
from tessera.sampling.solvers import sample

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "AutoPipelineForText2Image",
             "LatentConsistencyModelPipeline")


SD_DEFAULTS = {"steps": 50, "cfg_scale": 7.5}  # diffusers' StableDiffusionPipeline defaults
LCM_DEFAULTS = {"steps": 4, "cfg_scale": 8.5}  # its LatentConsistencyModelPipeline's (an LCM-distilled U-Net)


class StableDiffusionPipeline(onednn.Prepacked, Pipeline):
    paradigm = "diffusion"
    Params = DiffusionSampleParams  # the same sampling settings as Tessera's own diffusion pipelines
    CALL_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "negative_prompt": "negative_prompt"}

    def __init__(self, unet, vae, text_encoder, *, scheduler: DiffusionConfig, prepack: bool = True, **kw):
        """`prepack`: on a CPU in bf16, the networks' weights prepacked for oneDNN once (nn/onednn.py)."""
        if unet.config.cross_attention_dim != text_encoder.dim:
            raise WrongModelError(f"the U-Net cross-attends to {unet.config.cross_attention_dim}-d states; the text "
                                  f"encoder gives {text_encoder.dim}-d")
        self.scheduler, self.schedule = scheduler, Schedule(scheduler)
        self.prepack, self._compiled = prepack, None
        super().__init__(unet, vae, text_encoder, **kw)

    @property
    def networks(self) -> list[torch.nn.Module]:
        return [self.generator, self.tokenizer, self.text_encoder.model]

    def to(self, device=None, dtype=None):
        """Unlike Tessera's small models, an SD pipeline keeps its weights IN the compute dtype (an 866 M
        U-Net in bf16 is 1.7 GB, and autocast would re-cast every weight at every step); under float16 the
        SD1/2 VAE (`force_upcast`: it overflows in float16, not in bfloat16) stays float32, as in diffusers.
        On a CPU in bf16 the weights are then prepacked for oneDNN (unless `prepack` is off)."""
        with self.unpacked():
            super().to(device, dtype)
            p = self.placement
            self.generator.to(p.device, p.dtype, memory_format=torch.channels_last)  # oneDNN's / cuDNN's layout
            self.text_encoder.model.to(p.device, p.dtype)
            self.tokenizer.to(p.device, _vae_dtype(self.tokenizer.config, p.dtype), memory_format=torch.channels_last)
        return self

    def set_speed(self, prepack: bool | None = None, attention: str | None = None, tome: float | None = None,
                  compile: bool | None = None):
        """The CPU speed options, each on its own switch (benchmarks/bench_sd_pipeline.py compares them):
        prepack   oneDNN-prepacked weights on a CPU in bf16 (nn/onednn.py; default on; lossless)
        attention sdpa | gemm | auto: the U-Net's attention kernel (nn/kernels.py; default sdpa)
        tome      token merging ratio at the full-resolution level (nn/tome.py; default 0: off; lossy)
        compile   torch.compile of the U-Net (inductor, weights frozen into the graph); each new input shape
                  compiles on its first call (minutes on 2 cores), so it is for warm servers (default off)."""
        if attention is not None:
            self.generator.set_attention(attention)
        if tome is not None:
            self.generator.set_tome(float(tome))
        if prepack is not None:
            with self.unpacked():
                self.prepack = bool(prepack)
        if compile is not None:
            self._compiled = None
            if compile:
                with self.unpacked():
                    self.prepack = False  # freezing packs the weights itself
                self._compiled = torch.compile(self.generator, dynamic=False, options={"freezing": True})
        return self

    def _unet(self, *args):
        return (self._compiled if self._compiled is not None else self.generator)(*args)

    @property
    def native_size(self) -> int:
        return self.generator.config.sample_size * self.tokenizer.factor

    def call_size(self, height: int | None, width: int | None) -> dict:
        """Any height / width the U-Net's levels divide (diffusers' rule: multiples of the VAE factor; here also
        of the U-Net's downsampling, which Tessera's U-Net does not pad); default: the native size."""
        return self.any_size(height, width, self.tokenizer.factor * 2 ** (len(self.generator.config.block_out_channels) - 1))

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        return clip_too_long(self.text_encoder, prompts)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> int:
        """Merge a LoRA file (diffusers / PEFT or kohya names) into the U-Net and the text encoder at `scale`;
        returns how many modules changed. Unmatched keys are an error naming them (pipelines/lora.py)."""
        from tessera.pipelines.lora import merge_lora

        with self.unpacked():
            return merge_lora({"unet": self.generator, "text_encoder": self.text_encoder.model}, path, scale)

    def _states(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts).tokens.to(self.device)  # (n, 77, D)

    @torch.no_grad()
    def generate(self, prompts: list[str], p: DiffusionSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback: Callable[[int, int], None] | None = None,
                 conditioning: Callable[[torch.Generator], torch.Tensor] | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """-> x_0 latents [n,4,h,w] (the U-Net's space: VAE latents times scaling_factor) for images of `size`
        (height, width; default: native). `conditioning(g)` gives extra input channels [n,k,h,w]
        concatenated to the latents at every step (SD inpainting: the mask and the masked image's latents),
        drawn after x_T from the same generator, as diffusers does."""
        p.validate()
        n, f = len(prompts), self.tokenizer.factor
        height, width = size or (self.native_size, self.native_size)
        g = generator or torch.Generator().manual_seed(p.seed)
        shape = (n, self.tokenizer.config.latent_channels, height // f, width // f)
        x_T = initial_noise(shape, p, g) if latents is None else latents.float().cpu()
        if tuple(x_T.shape) != shape:
            raise InvalidInputError(f"latents: shape {tuple(x_T.shape)}, expected {shape}")
        extra = conditioning(g).to(self.device) if conditioning is not None else None
        if (extra.shape[1] if extra is not None else 0) + shape[1] != self.generator.config.in_channels:
            raise WrongModelError(f"the U-Net takes {self.generator.config.in_channels} input channels; "
                                  f"{'inpaint with it' if extra is None else 'it is not an inpainting U-Net'}")
        cond = self._states(prompts)
        lcm = self.generator.config.time_cond_proj_dim  # an LCM-distilled U-Net takes w as an input instead of CFG
        w_emb = guidance_embedding(torch.full((n,), p.cfg_scale - 1.0), lcm) if lcm else None  # (n, lcm)
        guided = p.cfg_scale > 1.0 and not lcm
        both = torch.cat([self._states([p.negative_prompt] * n), cond]) if guided else cond  # (2n | n, 77, D)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x, t = x.to(self.device), t.to(self.device)
            if extra is not None:
                x = torch.cat([x, extra], dim=1)  # (n, 4 + k, h, w)
            with self.placement.autocast():
                if not guided:
                    return self._unet(x, t, both, w_emb).float().cpu()
                u, c = self._unet(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)  # (n, 4, h, w)
                return (u + p.cfg_scale * (c - u)).cpu()

        return sample(fn, self.schedule, x_T, p.steps, p.method, p.eta, generator=g, callback=callback)

    @torch.no_grad()
    def inpaint(self, image, region, prompt: str, p: DiffusionSampleParams, callback=None) -> list:
        """Regenerate the white part of `region` (a mask image, as large as `image`) with a 9-channel
        inpainting U-Net: diffusers' StableDiffusionInpaintPipeline at strength 1 (the mask binarised at 0.5,
        the masked image encoded by sampling the VAE posterior)."""
        from tessera.data.dataset import to_tensor
        from tessera.pipelines.base import prompt_batch, to_images

        size = self.native_size
        if image.size != (size, size) or region.size != image.size:
            raise InvalidInputError(f"image and mask must be {size}x{size} (this pipeline's size), got "
                                    f"{image.size} and {region.size}")
        if not hasattr(self.tokenizer, "sample_latents"):
            raise WrongModelError("SD inpainting encodes the masked image with the KL autoencoder (not TAESD)")
        pixels = to_tensor(image)[None]  # (1, 3, H, W) in [-1, 1]
        mask = torch.from_numpy((np.asarray(region.convert("L"), dtype=np.float32) / 255 >= 0.5).astype(np.float32))
        mask = mask[None, None]  # (1, 1, H, W): 1 = regenerate
        n = p.n
        f = self.tokenizer.factor

        def conditioning(g: torch.Generator) -> torch.Tensor:
            masked = self.tokenizer.sample_latents(self._vae_input(pixels * (mask < 0.5)), g).float()
            masked = masked * self.tokenizer.config.scaling_factor  # (1, 4, h, w)
            small = torch.nn.functional.interpolate(mask, size=(size // f, size // f)).to(self.device)
            return torch.cat([small, masked], dim=1).repeat(n, 1, 1, 1)  # (n, 5, h, w)

        out = self.generate(prompt_batch(prompt, n), p, callback=callback, conditioning=conditioning)
        return to_images(self.decode(out))

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.tokenizer.config
        z = x0.float() / cfg.scaling_factor + cfg.shift_factor
        return self.tokenizer.decode_latents(self._vae_input(z)).float().clamp(-1, 1)

    def _vae_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on the device in the autoencoder's own weight dtype (see `to`)."""
        return x.to(self.device, next(self.tokenizer.parameters()).dtype)


def clip_too_long(text_encoder, prompts: list[str]) -> list[str | None]:
    """Per prompt: None if the CLIP encoder takes it whole, else why not (prompts are never cut)."""
    limit = text_encoder.max_tokens
    return [None if n <= limit else f"{n} prompt tokens; CLIP takes at most {limit}"
            for n in text_encoder.token_counts(prompts)]


def _vae_dtype(config, dtype: torch.dtype) -> torch.dtype:
    """SD1/2's VAE (config `force_upcast`; an object or a config.json dict) overflows in float16, so it runs in
    float32 then; else the compute dtype."""
    force = config.get("force_upcast", False) if isinstance(config, dict) else getattr(config, "force_upcast", False)
    return torch.float32 if dtype == torch.float16 and force else dtype


# ---- a diffusers folder -----------------------------------------------------------------------------------
def is_diffusers_folder(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return "_diffusers_version" in json.loads(index.read_text())
    except ValueError:
        return False


def is_tessera_sd_folder(path: str | Path) -> bool:
    """A Tessera pipeline folder of a Stable Diffusion pipeline (`tessera convert`'s output)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == "StableDiffusionPipeline" and "_tessera_version" in index


@functools.lru_cache(maxsize=8)
def clip_budget(spec: str):
    """The CLIP prompt budget (prompts/enhance.ClipBudget) of an SD model spec, read from its tokenizer files
    alone (the gateway enhances prompts without loading the networks); None for any other model."""
    from transformers import CLIPTokenizer

    from tessera.prompts import ClipBudget

    folder = Path(spec)
    where = folder / "tokenizer" if is_diffusers_folder(folder) else folder / "text_encoder" \
        if is_tessera_sd_folder(folder) else None
    if where is None:
        return None
    tok = CLIPTokenizer.from_pretrained(str(where), local_files_only=True)
    return ClipBudget(lambda prompt: len(tok(prompt, truncation=False, verbose=False)["input_ids"]), int(tok.model_max_length))


def weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """`stem[.variant].safetensors` (safetensors only: never a pickle); with no variant asked, the plain file,
    else the only variant the folder has (a folder of fp16 weights alone loads as it is)."""
    names = ([f"{stem}.{variant}.safetensors"] if variant else []) + [f"{stem}.safetensors"]
    found = [folder / n for n in names if (folder / n).is_file()]
    if not found and variant is None:
        found = sorted(folder.glob(f"{stem}.*.safetensors"))
        if len(found) > 1:
            raise ModelNotFoundError(f"{folder}: weights in several variants ({', '.join(f.name for f in found)}); "
                                     f"choose one (variant=)")
    if not found:
        raise ModelNotFoundError(f"{folder}: no {' or '.join(names)} (weights are read from safetensors only)")
    return found[0]


def _weights(folder: Path, variant: str | None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from tessera.checkpoint import read_safetensors

    return read_safetensors(weights_file(folder, "diffusion_pytorch_model", variant), dtype)


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{folder / 'config.json'}: {e}") from None


def load_unet(folder: str | Path, variant: str | None = None, dtype: torch.dtype | None = None):
    from tessera.generators.sd_unet import SDUNet, SDUNetConfig
    from tessera.nn.quant import apply_stored

    folder = Path(folder)
    config = SDUNetConfig.from_diffusers(_config(folder))
    unet = on_meta(lambda: SDUNet(config))
    unet.quantization = apply_stored(unet, folder)  # an int8 U-Net (`tessera optimize --int8`), or None
    return load_strict(unet, _weights(folder, variant, dtype), folder, dtype).eval()


def load_vae(folder: str | Path, variant: str | None = None, dtype: torch.dtype | None = None):
    """AutoencoderKL (the SD VAE), AutoencoderTiny (TAESD) or VQModel (aMUSEd's), by the folder's `_class_name`."""
    from tessera.nn.quant import apply_stored
    from tessera.tokenizer.kl import KLAutoencoder, KLAutoencoderConfig
    from tessera.tokenizer.taesd import TinyAutoencoder, TinyAutoencoderConfig

    folder = Path(folder)
    config = _config(folder)
    from tessera.tokenizer.vqmodel import VQModel, VQModelConfig

    classes = {"AutoencoderKL": (KLAutoencoder, KLAutoencoderConfig),
               "AutoencoderTiny": (TinyAutoencoder, TinyAutoencoderConfig), "VQModel": (VQModel, VQModelConfig)}
    if config.get("_class_name") not in classes:
        raise WrongModelError(f"{folder}: a {config.get('_class_name')!r} autoencoder; Tessera reads {sorted(classes)}")
    model_cls, config_cls = classes[config["_class_name"]]
    config = config_cls.from_diffusers(config)
    dtype = _vae_dtype(config, dtype or torch.float32)
    vae = on_meta(lambda: model_cls(config))
    vae.quantization = apply_stored(vae, folder)  # TAESD's int8 decoder (`tessera optimize --int8`), or None
    return load_strict(vae, _weights(folder, variant, dtype), folder, dtype).eval()


def _quant_note(net) -> dict:
    """What the PNG record says of an int8 U-Net / autoencoder (nothing for a float one)."""
    q = getattr(net, "quantization", None)
    return {} if q is None else {"quantization": f"int8 static, {len(q['quantized'])} layers ({len(q['kept'])} kept float)"}


def load_diffusers_folder(folder: str | Path, device=None, variant: str | None = None, vae: str | Path | None = None,
                          clip_skip: int | None = None) -> StableDiffusionPipeline:
    """A diffusers Stable Diffusion folder as a Tessera pipeline (`vae`: another autoencoder folder, e.g.
    TAESD, instead of the folder's own)."""
    from tessera.text.clip import CLIPPromptEncoder

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") not in PIPELINES or "unet" not in index:
        raise WrongModelError(f"{folder}: a {index.get('_class_name')!r} folder; Tessera reads {PIPELINES} (with a unet)")
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / comp).is_dir():
            raise ModelNotFoundError(f"{folder}: the {comp}/ component is missing")
    scheduler, method = DiffusionConfig.from_diffusers(json.loads((folder / "scheduler" / "scheduler_config.json")
                                                                  .read_text()))
    device = device if isinstance(device, Placement) else placement(device)
    text_variant = weights_file(folder / "text_encoder", "model", variant).name.split(".")[1:-1]
    text = CLIPPromptEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", clip_skip, device.dtype,
                                          variant=text_variant[0] if text_variant else None)
    unet = load_unet(folder / "unet", variant, device.dtype)
    # PNDM (SD 1.5's own scheduler) has no Tessera sampler: DPM-Solver++ (2M) on the same noise schedule
    defaults = LCM_DEFAULTS if index["_class_name"] == "LatentConsistencyModelPipeline" else SD_DEFAULTS
    pipe = StableDiffusionPipeline(unet, load_vae(vae or folder / "vae", variant, device.dtype), text, scheduler=scheduler,
                                   sampler={**defaults, "method": method or "dpmpp_2m"}, device=device)
    pipe.source = str(folder)
    pipe.models = {"generator": {"name": str(folder / "unet"), "kind": "sd-unet", **_quant_note(unet)},
                   "tokenizer": {"name": str(vae or folder / "vae"), **_quant_note(pipe.tokenizer)},
                   "text_encoder": {"name": text.name}}
    return pipe
