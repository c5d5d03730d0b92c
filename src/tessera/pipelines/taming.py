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

from pathlib import Path

import torch

from tessera.errors import InvalidInputError, WrongModelError
from tessera.pipelines.base import PipelineOutput, to_images

NET2NET = "taming.models.cond_transformer.Net2NetTransformer"


class TamingPipeline:
    def __init__(self, transformer, vqgan, sos_token: int | None = 0, n_classes: int | None = None):
        self.transformer, self.vqgan = transformer.eval(), vqgan.eval()
        self.sos_token, self.n_classes = sos_token, n_classes
        # the window is the token grid the transformer was trained on (the first stage's training resolution);
        # it sees one conditioning id (SOS or the class) and all but the window's last token
        self.window = vqgan.config.resolution // vqgan.factor
        if self.window ** 2 > transformer.config.block_size:
            raise WrongModelError(f"a {self.window}x{self.window} token window needs a block size of at least "
                                  f"{self.window ** 2}; the transformer has {transformer.config.block_size}")

    @property
    def native_size(self) -> int:
        return self.window * self.vqgan.factor

    @classmethod
    def from_release(cls, folder: str | Path, dtype: torch.dtype = torch.float32, trust_pickle: bool = False):
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
        return cls(gpt, vq, sos, n_classes)

    @torch.no_grad()
    def __call__(self, class_label: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, output_type: str = "pil",
                 callback=None) -> PipelineOutput:
        from tessera.sampling.window import sample_grid

        if self.n_classes is not None and (class_label is None or not 0 <= class_label < self.n_classes):
            raise InvalidInputError(f"class_label={class_label}: this model takes a class in [0, {self.n_classes})")
        if self.n_classes is None and class_label is not None:
            raise InvalidInputError("class_label: this model is unconditional")
        f = self.vqgan.factor
        h, w = height or self.native_size, width or self.native_size
        if h % f or w % f or min(h, w) < self.native_size:
            raise InvalidInputError(f"height / width must be multiples of {f}, at least {self.native_size}")
        first = self.sos_token if self.n_classes is None else class_label
        cond = torch.full((num_images_per_prompt, 1), first, dtype=torch.long)
        g = generator or torch.Generator().manual_seed(0)
        ids = sample_grid(self.transformer, cond, (h // f, w // f), self.window, generator=g,
                          temperature=temperature, top_k=top_k or 0, callback=callback)
        images = to_images(self.vqgan.decode_tokens(ids).float().clamp(-1, 1), output_type)
        return PipelineOutput(images, {"class_label": class_label, "temperature": temperature, "top_k": top_k,
                                       "seed": g.initial_seed(), "tokens": ids})
