"""taming-transformers' image model (seed 000's reference system): a Net2NetTransformer release folder
(`configs/model.yaml` + `checkpoints/last.ckpt`) read into Tessera's TamingGPT and TamingVQGAN, sampled
with the sliding window (sampling/window.py) so grids larger than the transformer's context work.

    pipe = TamingPipeline.from_release(DIR)
    pipe(class_label=7, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
         height=256, width=384, temperature=1.0, top_k=100).images

Conditioning as released: unconditional models prepend one SOS id; class-conditional ones (ImageNet) the
class id, embedded by the same table as the image tokens. Weights are read as tensors only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tessera.errors import InvalidInputError, WrongModelError
from tessera.pipelines.base import Pipeline, check_limits, class_labels

NET2NET = "taming.models.cond_transformer.Net2NetTransformer"


@dataclasses.dataclass
class TamingSampleParams:
    """taming-transformers' sampler: temperature and top-k, no guidance (cfg_scale stays 1)."""

    seed: int = 0
    n: int = 1
    class_label: int | None = None
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0

    def validate(self) -> None:
        check_limits(self)
        if self.cfg_scale != 1.0:
            raise InvalidInputError(f"cfg_scale={self.cfg_scale}: a taming-transformers model has no guidance (1 only)")
        if not 0 < self.temperature <= 5 or self.top_k < 0:
            raise InvalidInputError(f"temperature={self.temperature}, top_k={self.top_k}: temperature in (0, 5], "
                                    f"top_k >= 0 (0: off)")


class TamingPipeline(Pipeline):
    """The autoregressive paradigm's pipeline for a Net2Net release: unconditional (SOS) or class-conditional
    (the class label, not the prompt), any size through the sliding window (`height` / `width`)."""

    paradigm = "ar"
    Params = TamingSampleParams

    def __init__(self, transformer, vqgan, sos_token: int | None = 0, n_classes: int | None = None, **kw):
        self.sos_token, self.n_classes = sos_token, n_classes
        # the window is the token grid the transformer was trained on (the first stage's training resolution);
        # it sees one conditioning id (SOS or the class) and all but the window's last token
        self.window = vqgan.config.resolution // vqgan.factor
        if self.window ** 2 > transformer.config.block_size:
            raise WrongModelError(f"a {self.window}x{self.window} token window needs a block size of at least "
                                  f"{self.window ** 2}; the transformer has {transformer.config.block_size}")
        super().__init__(transformer, vqgan, **kw)

    @property
    def transformer(self):
        return self.generator

    @property
    def vqgan(self):
        return self.tokenizer

    @property
    def native_size(self) -> int:
        return self.window * self.vqgan.factor

    @classmethod
    def from_release(cls, folder: str | Path, dtype: torch.dtype = torch.float32, trust_pickle: bool = False,
                     device=None):
        from tessera.checkpoint import load_strict, on_meta, read_pickled_state
        from tessera.generators.taming_gpt import TamingGPT, TamingGPTConfig
        from tessera.tokenizer.taming import CHECKPOINT, MODEL_YAML, TamingVQGAN, release_model, vq_config

        folder = Path(folder)
        model = release_model(folder)
        if model.get("target") != NET2NET:
            raise WrongModelError(f"{folder / MODEL_YAML}: a {model.get('target')!r}, not a {NET2NET}")
        params = model["params"]
        tcfg = TamingGPTConfig(**{k: v for k, v in params["transformer_config"]["params"].items()
                                  if k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_unmasked")})
        vcfg = vq_config(params["first_stage_config"]["params"], folder / MODEL_YAML)
        cond = params.get("cond_stage_config", "__is_unconditional__")
        target = cond.get("target", "") if isinstance(cond, dict) else cond
        sos, n_classes = None, None
        if target == "__is_unconditional__" or target.endswith("SOSProvider"):
            sos = int((cond.get("params", {}) if isinstance(cond, dict) else {}).get("sos_token", 0))
        elif target.endswith("Labelator"):
            n_classes = int(cond["params"]["n_classes"])
        else:
            raise WrongModelError(f"{folder / MODEL_YAML}: conditioning {target!r} is not implemented "
                                  f"(unconditional / SOS and class labels are)")
        state = read_pickled_state(folder / CHECKPOINT, trust_pickle)
        part = {p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
                for p in ("transformer", "first_stage_model")}
        gpt = load_strict(on_meta(lambda: TamingGPT(tcfg)), part["transformer"], folder / CHECKPOINT, dtype)
        vq = load_strict(on_meta(lambda: TamingVQGAN(vcfg)), part["first_stage_model"], folder / CHECKPOINT, dtype)
        return cls(gpt, vq, sos, n_classes, device=device)

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        return [None] * len(prompts)  # the prompt is not read

    def call_size(self, height: int | None, width: int | None) -> dict:
        """Any multiple of the VQ factor from the native size up (the window slides over a larger grid)."""
        f = self.vqgan.factor
        h, w = height or self.native_size, width or self.native_size
        if h % f or w % f or min(h, w) < self.native_size or max(h, w) > 2048:
            raise InvalidInputError(f"height={h}, width={w}: must be multiples of {f} between {self.native_size} "
                                    f"and 2048")
        return {} if (h, w) == (self.native_size,) * 2 else {"size": (h, w)}

    @torch.no_grad()
    def generate(self, prompts: list[str], p: TamingSampleParams, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, callback=None, size: tuple[int, int] | None = None):
        """-> token grids [n, h, w] (size: the image's height, width; default native)."""
        from tessera.sampling.window import sample_grid

        p.validate()
        n = len(prompts)
        if self.n_classes is None:
            if p.class_label is not None:
                raise InvalidInputError("class_label: this model is unconditional")
            first = torch.full((n,), self.sos_token, dtype=torch.long)
        else:
            first = class_labels(p.class_label, self.n_classes, n)
        if latents is not None:
            raise InvalidInputError("latents: an autoregressive draw starts from its condition alone")
        f = self.vqgan.factor
        h, w = size or (self.native_size, self.native_size)
        g = generator or torch.Generator().manual_seed(p.seed)
        return sample_grid(self.transformer, first[:, None].to(self.device), (h // f, w // f), self.window,
                           generator=g, temperature=p.temperature, top_k=p.top_k, callback=callback)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode_tokens(tokens.to(self.device)).float().clamp(-1, 1)
