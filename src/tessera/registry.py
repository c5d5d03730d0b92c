"""Named presets and model kinds.

A *kind* names a model class and its config class ("vq" -> VQModel, VQConfig). A *preset* is a named
config of a kind ("vq-f8"). Bundled default models live in `tessera/weights/<preset>/` as export
folders; `tessera.load("vq-f8")` loads that folder, and fails loudly if it is missing.
"""
from __future__ import annotations

import importlib
import importlib.resources
from pathlib import Path
from typing import Any

# kind -> ("module:Class", "module:ConfigClass")
KINDS: dict[str, tuple[str, str]] = {
    "vq": ("tessera.tokenizer.vq:VQModel", "tessera.tokenizer.vq:VQConfig"),
    "ar": ("tessera.generators.ar:ARTransformer", "tessera.generators.ar:ARConfig"),
    "unet": ("tessera.generators.unet:UNet", "tessera.generators.unet:UNetConfig"),
    "dit": ("tessera.generators.dit:DiT", "tessera.generators.dit:DiTConfig"),
    "masked": ("tessera.generators.masked:MaskedTransformer", "tessera.generators.masked:MaskedConfig"),
    "rrdbnet": ("tessera.superres.rrdbnet:RRDBNet", "tessera.superres.rrdbnet:RRDBNetConfig"),
    "srvgg": ("tessera.superres.srvgg:SRVGGNetCompact", "tessera.superres.srvgg:SRVGGConfig"),
    "contrastive": ("tessera.eval.contrastive:ImageTextModel", "tessera.eval.contrastive:ContrastiveConfig"),
    "prompt-safety": ("tessera.safety.classifier:PromptSafetyClassifier", "tessera.safety.classifier:PromptSafetyConfig"),
}

# preset -> (kind, config overrides)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # 128 px -> 16x16 tokens, 8192 codes of dim 8 (seed 000 "Image tokenizer"); the bundled default
    "vq-f8": ("vq", dict(base_channels=32, channel_mult=(1, 2, 4, 8), codebook_size=8192)),
    # 256 px -> 16x16 tokens
    "vq-f16": ("vq", dict(resolution=256, base_channels=32, channel_mult=(1, 2, 2, 4, 8), codebook_size=8192)),
    # decoder-only Transformers over 16x16 vq-f8 tokens, MiniLM (384-d) prompt prefix
    "ar-s": ("ar", dict(dim=384, depth=8, heads=6, cond_dim=384, max_text_tokens=64)),
    "ar-m": ("ar", dict(dim=512, depth=12, heads=8, cond_dim=384, max_text_tokens=64)),
    # the bundled default: small enough (~5.8M parameters, 12 MB fp16) to sit beside the tokenizer
    "ar-xs": ("ar", dict(dim=192, depth=6, heads=6, dropout=0.1, cond_dim=384, max_text_tokens=64)),
    "ar-s-uncond": ("ar", dict(dim=384, depth=8, heads=6, cond_dim=0)),
    # bidirectional masked Transformers over 16x16 vq-f8 tokens (Muse), MiniLM cross-attention;
    # masked-xs matches ar-xs in width / depth / heads for the side-by-side comparison
    "masked-s": ("masked", dict(dim=384, depth=8, heads=6, cond_dim=384, max_text_tokens=64)),
    "masked-xs": ("masked", dict(dim=192, depth=6, heads=6, dropout=0.1, cond_dim=384, max_text_tokens=64)),
    # the bundled masked default: masked-xs with 4 blocks (5.8 M parameters, 11.7 MB fp16) to fit the 60 MB budget
    "masked-xxs": ("masked", dict(dim=192, depth=4, heads=6, dropout=0.1, cond_dim=384, max_text_tokens=64)),
    # latent-diffusion U-Nets over 16x16x8 vq-f8 latents, MiniLM (384-d) cross-attention
    "unet-s": ("unet", dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, heads=4)),
    "unet-xs": ("unet", dict(base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, heads=4)),
    # latent-diffusion Transformers: 16x16x8 latents in 2x2 patches = 64 tokens
    "dit-s": ("dit", dict(dim=256, depth=8, heads=4, patch_size=2)),
    "dit-xs": ("dit", dict(dim=192, depth=6, heads=4, patch_size=2)),
    # super-resolution: Real-ESRGAN's x4plus architecture (pretrained weights: superres.pretrained) and
    # compact residual nets (SRVGGNetCompact) for Tessera's own fast x4 / x2 models
    "rrdb-x4": ("rrdbnet", dict(num_block=23, scale=4)),
    "sr-compact-x4": ("srvgg", dict(num_feat=48, num_conv=12, upscale=4)),
    "sr-compact-x2": ("srvgg", dict(num_feat=32, num_conv=8, upscale=2)),
    # contrastive image-text model over frozen MiniLM sentence vectors: offline CLIPScore, caption filtering
    "clip-xs": ("contrastive", dict(image_size=64, channels=(32, 64, 128, 256), text_dim=384, embed_dim=256)),
    # the prompt-policy classifier over MiniLM sentence vectors (safety/)
    "prompt-safety": ("prompt-safety", dict(text_dim=384, hidden=128)),
    # for tests: tiny and fast
    "ar-tiny": ("ar", dict(vocab_size=64, grid=(4, 4), dim=32, depth=2, heads=4, cond_dim=16, max_text_tokens=8)),
    "unet-tiny": ("unet", dict(in_channels=4, sample_size=8, base_channels=16, channel_mult=(1, 2),
                               attn_levels=(False, True), heads=2, cond_dim=16, max_text_tokens=8)),
    "dit-tiny": ("dit", dict(in_channels=4, sample_size=8, patch_size=2, dim=32, depth=2, heads=2, cond_dim=16,
                             max_text_tokens=8)),
    "masked-tiny": ("masked", dict(vocab_size=64, grid=(4, 4), dim=32, depth=2, heads=4, cond_dim=16,
                                   max_text_tokens=8)),
    "clip-tiny": ("contrastive", dict(image_size=16, channels=(8, 16), stem_stride=1, text_encoder="tiny", text_dim=16,
                                      text_hidden=32, embed_dim=16)),
    "sr-tiny": ("srvgg", dict(num_feat=8, num_conv=2, upscale=2)),
    "vq-tiny": ("vq", dict(resolution=32, base_channels=8, channel_mult=(1, 2, 2), z_channels=16,
                           attn_heads=1, codebook_size=64, codebook_dim=4)),
}


def _import(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def model_class(kind: str) -> tuple[type, type]:
    if kind not in KINDS:
        raise KeyError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    cls_ref, cfg_ref = KINDS[kind]
    return _import(cls_ref), _import(cfg_ref)


def preset_config(name: str, **overrides: Any):
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    kind, kw = PRESETS[name]
    _, cfg_cls = model_class(kind)
    return kind, cfg_cls.from_dict({**kw, **overrides})


def build(name: str, **overrides: Any):
    """A freshly initialised model of a preset (random weights)."""
    kind, cfg = preset_config(name, **overrides)
    cls, _ = model_class(kind)
    return cls(cfg)


def bundled_dir(name: str) -> Path:
    return Path(str(importlib.resources.files("tessera") / "weights" / name))


def load(path_or_preset: str | Path):
    """Load an export folder, or the bundled weights of a named preset."""
    from tessera.checkpoint import CheckpointError, load_model

    p = Path(path_or_preset)
    if p.is_dir():
        return load_model(p)
    name = str(path_or_preset)
    if name in PRESETS:
        folder = bundled_dir(name)
        if not folder.is_dir():
            raise CheckpointError(f"preset {name!r} has no bundled weights at {folder}; "
                                  f"train one (`tessera train`) and pass its exported folder")
        return load_model(folder)
    raise CheckpointError(f"{path_or_preset!r} is neither a model folder nor a preset ({sorted(PRESETS)})")
