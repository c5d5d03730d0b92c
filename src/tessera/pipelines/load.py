"""One loader over the generator kinds: an exported AR, masked or diffusion model (folder or bundled
preset) -> its pipeline, the sampling-parameter class it takes, and the identity of every model file
involved (name + sha256), for the records that evaluation writes beside its images."""
from __future__ import annotations

import dataclasses
from typing import Any

from tessera.pipelines.ar import ARPipeline, ARSampleParams
from tessera.pipelines.diffusion import DiffusionPipeline, DiffusionSampleParams
from tessera.pipelines.masked import MaskedPipeline, MaskedSampleParams

PARAMS = {"ar": ARSampleParams, "masked": MaskedSampleParams, "diffusion": DiffusionSampleParams}
SAMPLERS = {"ar": "ar-kv-cache", "masked": "maskgit-cosine", "diffusion": None}  # diffusion: params.method


@dataclasses.dataclass
class LoadedPipeline:
    kind: str                       # ar | masked | diffusion
    pipe: ARPipeline | MaskedPipeline | DiffusionPipeline
    models: dict[str, dict]         # role -> {"name", "sha256", ...}
    network: object = None          # the generator / denoiser
    text_encoder: object = None

    def too_long(self, prompts: list[str], batch: int = 64) -> list[str | None]:
        """Per prompt: None if the generator takes it, else why not (prompts are never silently cut)."""
        cfg = self.network.config
        if not cfg.conditional:
            return [None] * len(prompts)
        limit, out = cfg.max_text_tokens, []
        for s in range(0, len(prompts), batch):
            lengths = self.text_encoder.encode(prompts[s:s + batch]).mask.sum(1).tolist()
            out += [None if n <= limit else f"{n} prompt tokens; the generator takes at most {limit}"
                    for n in lengths]
        return out

    def params(self, **settings: Any):
        """Sampling parameters of this kind; an unknown setting is an error (named)."""
        cls = PARAMS[self.kind]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown {self.kind} sampling setting(s) {unknown}; known: {sorted(names)}")
        return cls(**settings)


def _identity(name: str, model) -> dict:
    meta = getattr(model, "meta", {})
    return {"name": name, "kind": meta.get("kind"), "sha256": meta.get("sha256"),
            "trained_steps": meta.get("trained_steps")}


def load_pipeline(model: str, tokenizer: str | None = None, text_encoder: str = "minilm") -> LoadedPipeline:
    import tessera
    from tessera.text import load_text_encoder
    from tessera.tokenizer.tools import load_tokenizer

    net = tessera.load(model)
    meta = getattr(net, "meta", {})
    kind = {"ar": "ar", "masked": "masked", "unet": "diffusion", "dit": "diffusion"}.get(meta.get("kind"))
    if kind is None:
        raise ValueError(f"{model} is a {meta.get('kind')!r} model, not a generator (ar, masked, unet, dit)")
    task = meta.get("task", {})
    tok_name = tokenizer or task.get("tokenizer", "vq-f8")
    tok = load_tokenizer(tok_name) if kind != "diffusion" or task.get("space") == "latent" else None
    enc = load_text_encoder(text_encoder) if net.config.conditional else None
    cls = {"ar": ARPipeline, "masked": MaskedPipeline, "diffusion": DiffusionPipeline}[kind]
    models = {"generator": _identity(model, net)}
    if tok is not None:
        models["tokenizer"] = _identity(tok_name, tok)
    if enc is not None:
        models["text_encoder"] = {"name": text_encoder}
    return LoadedPipeline(kind, cls(net, tok, enc), models, net, enc)
