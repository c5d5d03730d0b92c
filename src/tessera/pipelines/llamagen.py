"""LlamaGen (Sun et al. 2024): a folder holding a released GPT and its VQ tokenizer, read as tensors only into
Tessera's LlamaGenGPT and LlamaGenVQ, sampled by sampling/ar.py with the KV cache and classifier-free guidance
by batch duplication (when the scale is > 1, as the release's generate.py):

    class-to-image  c2i_{B,L,XL,XXL}_{256,384}.pt + vq_ds16_c2i.pt; the null class guides
    text-to-image   t2i_XL_stage{1,2}_{256,512}.pt + vq_ds16_t2i.pt + a FLAN-T5 folder (transformers; the
                    encoder's 120-token states, left-padded, padding masked); the stored
                    uncond_embedding guides.

    pipe = tessera.load(DIR)        # or LlamaGenPipeline.from_release(gpt_file, vq_file)
    pipe(class_label=207, num_images_per_prompt=2, guidance_scale=4.0, top_k=2000,
         generator=torch.Generator().manual_seed(0)).images
    tessera generate "a dog" --model DIR --class-label 207   (the whole system; the prompt is not read)

Defaults are the releases' (`sample_c2i.py`: guidance 4.0, top-k 2000; `sample_t2i.py`: 7.5, 1000).
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from tessera.errors import InvalidInputError, ModelNotFoundError, WrongModelError
from tessera.pipelines.base import Pipeline, check_limits, class_labels

SIZES = {"B": dict(n_layer=12, n_head=12, dim=768), "L": dict(n_layer=24, n_head=16, dim=1024),
         "XL": dict(n_layer=36, n_head=20, dim=1280), "XXL": dict(n_layer=48, n_head=24, dim=1536)}
GPT_FILE = re.compile(r"^c2i_(B|L|XL|XXL)_(256|384)\.pt$")
T2I_FILE = re.compile(r"^t2i_(B|L|XL|XXL)_stage\d_(256|384|512)\.pt$")
VQ_FILE, T2I_VQ_FILE = "vq_ds16_c2i.pt", "vq_ds16_t2i.pt"
T2I_DEFAULTS = {"cfg_scale": 7.5, "top_k": 1000}  # sample_t2i.py's


def release_files(folder: str | Path) -> tuple[Path, Path, str, int] | None:
    """(gpt file, vq file, size name, image size) when `folder` holds one LlamaGen c2i or t2i release."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for pattern, vq in ((GPT_FILE, VQ_FILE), (T2I_FILE, T2I_VQ_FILE)):
        found = [(f, pattern.match(f.name)) for f in sorted(folder.iterdir())]
        found = [(f, m) for f, m in found if m]
        if len(found) == 1 and (folder / vq).is_file():
            (gpt, m), = found
            return gpt, folder / vq, m[1], int(m[2])
    return None


def t5_folder(folder: Path) -> Path:
    """The one transformers T5 folder inside a t2i release folder (config.json with model_type t5)."""
    import json

    found = [d for d in sorted(folder.iterdir()) if (d / "config.json").is_file()
             and json.loads((d / "config.json").read_text()).get("model_type") in ("t5", "mt5")]
    if len(found) != 1:
        raise ModelNotFoundError(f"{folder}: a text-to-image release needs one FLAN-T5 folder (transformers' "
                                 f"save_pretrained, e.g. flan-t5-xl/); found {[d.name for d in found]}")
    return found[0]


def left_padded(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption states [B,L,D] with mask [B,L] (valid first) -> [B,length,D], [B,length]: each caption's valid
    states moved to the END, zeros before them (LlamaGen's left padding, sample_t2i.py)."""
    b, _, d = states.shape
    out = torch.zeros(b, length, d, dtype=states.dtype, device=states.device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=states.device)
    for i, n in enumerate(mask.sum(1).tolist()):
        if n > length:
            raise InvalidInputError(f"a prompt encodes to {n} tokens; LlamaGen's text-to-image takes at most {length}")
        out[i, length - n:], valid[i, length - n:] = states[i, :n], True
    return out, valid


@dataclasses.dataclass
class LlamaGenSampleParams:
    """A LlamaGen draw (class-to-image defaults of `sample_c2i.py`: guidance 4.0, top-k 2000; text-to-image
    pipelines start from T2I_DEFAULTS); `class_label`: class-to-image only."""

    seed: int = 0
    n: int = 1
    class_label: int | None = None
    cfg_scale: float = 4.0
    temperature: float = 1.0
    top_k: int = 2000
    top_p: float = 1.0
    cfg_interval: int = -1   # generate.py's: guide the prefill token and decode steps 0..K (-1: all)

    def validate(self) -> None:
        check_limits(self)
        if not 0 < self.temperature <= 5:
            raise InvalidInputError(f"temperature={self.temperature}: must be in (0, 5]")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_k={self.top_k}, top_p={self.top_p}: top_k >= 0 (0: off), top_p in (0, 1]")


class LlamaGenPipeline(Pipeline):
    """The autoregressive paradigm's pipeline for a LlamaGen release. Class-to-image: the class label (not the
    prompt) conditions it (`tessera generate --model DIR --class-label N`, the HTTP `class_label` field);
    text-to-image: the prompt, through the release's FLAN-T5 (`text_encoder`, transformers)."""

    paradigm = "ar"
    Params = LlamaGenSampleParams

    def __init__(self, gpt, vq, text_encoder=None, **kw):
        cfg = gpt.config
        self.grid = math.isqrt(cfg.block_size)
        if cfg.model_type == "t2i":
            if text_encoder is None or text_encoder.dim != cfg.caption_dim:
                raise WrongModelError(f"a text-to-image LlamaGen needs a {cfg.caption_dim}-d T5 text encoder")
            kw["sampler"] = {**T2I_DEFAULTS, **(kw.get("sampler") or {})}
        super().__init__(gpt, vq, text_encoder, **kw)

    @property
    def gpt(self):
        return self.generator

    @property
    def vq(self):
        return self.tokenizer

    @property
    def native_size(self) -> int:
        return self.grid * self.vq.factor

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        if self.text_encoder is None:
            return [None] * len(prompts)  # class-to-image: the prompt is not read
        limit = self.gpt.config.cls_token_num
        counts = [len(ids) for ids in self.text_encoder.tokenizer(prompts)["input_ids"]]
        return [None if n <= limit else f"{n} prompt tokens; LlamaGen's T5 condition takes {limit}" for n in counts]

    def _condition(self, prompts: list[str], p: "LlamaGenSampleParams"):
        """-> (condition rows, null rows or None, their caption mask or None) for `prompts`."""
        cfg, n = self.gpt.config, len(prompts)
        guided = p.cfg_scale > 1.0
        if cfg.model_type == "c2i":
            labels = class_labels(p.class_label, cfg.num_classes, n).to(self.device)
            return labels, (torch.full_like(labels, self.gpt.null_class) if guided else None), None
        if p.class_label is not None:
            raise InvalidInputError("class_label: this LlamaGen model is text-to-image (the prompt conditions it)")
        enc = self.text_encoder.encode(prompts)
        states, mask = left_padded(enc.tokens.to(self.device), enc.mask.to(self.device), cfg.cls_token_num)
        states = (states * mask[..., None]).to(self.gpt.tok_embeddings.weight.dtype)  # (n, 120, caption_dim), pads 0
        null = self.gpt.cls_embedding.uncond_embedding.to(states.dtype).expand_as(states) if guided else None
        return states, null, (torch.cat([mask, mask]) if guided else mask)

    def set_speed(self, int8: bool = False, compile: bool = False):
        """The decode-step options (benchmarks/bench_llamagen.py measures them): `int8` swaps the GPT's linear
        layers for int8 weight-only ones (nn/quant.py: half the weight bytes per token; lossy, so the tokens
        differ from bf16's; irreversible: reload to undo); `compile` compiles the one-token step."""
        if int8:
            from tessera.nn.quant import quantize_int8

            self.gpt.to(torch.bfloat16)  # the int8 kernel's input dtype
            quantize_int8(self.gpt)
        self.gpt.compile_step(compile)
        return self

    @torch.no_grad()
    def generate(self, prompts: list[str], p: LlamaGenSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """-> token grids [n, grid, grid] of class `p.class_label` (c2i) or of the prompts (t2i)."""
        from tessera.sampling.ar import prefix_logits_fn, sample

        p.validate()
        if latents is not None:
            raise InvalidInputError("latents: an autoregressive draw starts from its condition alone")
        n = len(prompts)
        cond, null, cond_mask = self._condition(prompts, p)
        g = generator or torch.Generator().manual_seed(p.seed)
        tokens = sample(prefix_logits_fn(self.gpt, cond, null, cond_mask), n, self.grid * self.grid, generator=g,
                        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                        cfg_scale=p.cfg_scale if null is not None else 1.0, callback=callback,
                        cfg_interval=p.cfg_interval + 2 if p.cfg_interval >= 0 else -1)  # generate.py's count*
        return tokens.reshape(n, self.grid, self.grid)

    # * generate.py guides the prefill's token and then decode step i while i <= cfg_interval, i.e. image
    #   tokens 0 .. cfg_interval + 1; sampling/ar.sample guides tokens t < its cfg_interval

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_tokens(tokens.to(self.device)).float().clamp(-1, 1)

    @classmethod
    def from_release(cls, gpt_file: str | Path, vq_file: str | Path, size: str = "B", image_size: int = 256,
                     dtype: torch.dtype = torch.float32, device=None, text_encoder: str | Path | None = None,
                     **gpt_config):
        """`text_encoder`: a t2i release's T5 folder (default: the one beside `gpt_file`)."""
        from tessera.checkpoint import load_strict, on_meta, read_pickled_state
        from tessera.generators.llamagen import LlamaGenConfig, LlamaGenGPT
        from tessera.tokenizer.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

        if size not in SIZES:
            raise InvalidInputError(f"size={size!r}: LlamaGen's GPT sizes are {sorted(SIZES)}")
        vq_cfg = LlamaGenVQConfig(**gpt_config.pop("vq", {}))
        grid = image_size // vq_cfg.factor
        t2i = bool(T2I_FILE.match(Path(gpt_file).name)) or gpt_config.get("model_type") == "t2i"
        t2i_cfg = {"model_type": "t2i", "cls_token_num": 120} if t2i else {}
        cfg = LlamaGenConfig(**{**SIZES[size], "block_size": grid * grid, **t2i_cfg, **gpt_config})
        gpt = load_strict(LlamaGenGPT(cfg), read_pickled_state(gpt_file), Path(gpt_file), dtype)
        vq = load_strict(on_meta(lambda: LlamaGenVQ(vq_cfg)), read_pickled_state(vq_file), Path(vq_file), dtype)
        text = None
        if cfg.model_type == "t2i":
            from tessera.text import HFTextEncoder

            text = HFTextEncoder(text_encoder or t5_folder(Path(gpt_file).parent), max_tokens=cfg.cls_token_num,
                                 dtype=dtype)
        return cls(gpt, vq, text, device=device)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device=None, **config):
        found = release_files(folder)
        if found is None:
            raise ModelNotFoundError(f"{folder}: not a LlamaGen release folder (one c2i_<size>_<256|384>.pt and "
                                     f"{VQ_FILE})")
        gpt, vq, size, image_size = found
        return cls.from_release(gpt, vq, size, image_size, dtype, device, **config)
