"""Single-file Stable Diffusion checkpoints as shared on model hubs: one `.safetensors` in the original
LDM layout (`model.diffusion_model.*` U-Net, `first_stage_model.*` VAE, `cond_stage_model.transformer.*`
SD1 CLIP text encoder), mapped to diffusers' names (REFERENCE 2.1-2.2) and loaded strictly into Tessera's
networks. The structure is read from the tensors (widths, blocks, 4- or 9-channel input, conv or linear
projections, cross-attention width); what the tensors cannot say follows SD's own rules (heads: 8 per
block in SD1, width / 64 in SD2) or is an option (v-prediction). Safetensors only: a `.ckpt` pickle is
refused (convert it with a tool you trust, or use the diffusers folder).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tessera.errors import InvalidInputError, WrongModelError

UNET, VAE, CLIP_SD1, OPENCLIP_SD2 = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.",
                                     "cond_stage_model.model.")
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _rename(sub: dict[str, torch.Tensor], old: str, new: str, table: dict[str, str] | None = None) -> dict:
    """Keys under `old.` moved under `new.`; with `table`, the first part of the rest renamed by it."""
    out = {}
    for k, v in sub.items():
        if not k.startswith(old + "."):
            continue
        rest = k[len(old) + 1:]
        if table:
            for a, b in table.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
        out[f"{new}.{rest}"] = v
    return out


# ---- the U-Net ------------------------------------------------------------------------------------------
def unet_structure(unet: dict[str, torch.Tensor]) -> dict:
    """SDUNetConfig fields read from LDM U-Net tensors (prefix removed)."""
    blocks = sorted({int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    down_ops = [b for b in blocks if f"input_blocks.{b}.0.op.weight" in unet]
    levels = len(down_ops) + 1
    per = (len(blocks) - 1 - len(down_ops)) // levels  # blocks: conv_in, levels x layers, a downsampler per level
    widths, cross, depth = [], [], []
    for i in range(levels):
        first = 1 + i * (per + 1)
        widths.append(unet[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        cross.append(f"input_blocks.{first}.1.proj_in.weight" in unet)
        depth.append(len({m.group(1) for k in unet if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))})
                     or 1)
    attn = next(k for k in unet if k.endswith("attn2.to_k.weight"))
    linear = unet[next(k for k in unet if k.endswith(".proj_in.weight"))].ndim == 2
    return {"in_channels": unet["input_blocks.0.0.weight"].shape[1], "out_channels": unet["out.2.weight"].shape[0],
            "block_out_channels": tuple(widths), "cross_attention": tuple(cross), "layers_per_block": per,
            "transformer_depth": tuple(depth), "cross_attention_dim": unet[attn].shape[1],
            "use_linear_projection": linear,
            # not in the tensors: SD1 uses 8 heads everywhere, SD2 heads of width 64
            "heads": tuple(max(1, w // 64) for w in widths) if linear else (8,) * levels}


def unet_to_diffusers(unet: dict[str, torch.Tensor], layers_per_block: int, levels: int,
                      cross: tuple[bool, ...]) -> dict[str, torch.Tensor]:
    out = {**_rename(unet, "time_embed.0", "time_embedding.linear_1"),
           **_rename(unet, "time_embed.2", "time_embedding.linear_2"), **_rename(unet, "input_blocks.0.0", "conv_in"),
           **_rename(unet, "out.0", "conv_norm_out"), **_rename(unet, "out.2", "conv_out"),
           **_rename(unet, "middle_block.0", "mid_block.resnets.0", _RESNET),
           **_rename(unet, "middle_block.1", "mid_block.attentions.0"),
           **_rename(unet, "middle_block.2", "mid_block.resnets.1", _RESNET)}
    n = layers_per_block
    for i in range(levels):
        for j in range(n):
            b = 1 + i * (n + 1) + j
            out.update(_rename(unet, f"input_blocks.{b}.0", f"down_blocks.{i}.resnets.{j}", _RESNET))
            out.update(_rename(unet, f"input_blocks.{b}.1", f"down_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            out.update(_rename(unet, f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
        for j in range(n + 1):  # up level i mirrors down level levels - 1 - i
            b = i * (n + 1) + j
            out.update(_rename(unet, f"output_blocks.{b}.0", f"up_blocks.{i}.resnets.{j}", _RESNET))
            if cross[levels - 1 - i]:
                out.update(_rename(unet, f"output_blocks.{b}.1", f"up_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            b, k = i * (n + 1) + n, 2 if cross[levels - 1 - i] else 1
            out.update(_rename(unet, f"output_blocks.{b}.{k}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return out


# ---- the VAE --------------------------------------------------------------------------------------------
def vae_structure(vae: dict[str, torch.Tensor]) -> dict:
    levels = len({m.group(1) for k in vae if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    per = len({m.group(1) for k in vae if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    widths = tuple(vae[f"encoder.down.{i}.block.{per - 1}.conv2.weight"].shape[0] for i in range(levels))
    return {"in_channels": vae["encoder.conv_in.weight"].shape[1], "out_channels": vae["decoder.conv_out.weight"].shape[0],
            "latent_channels": vae["post_quant_conv.weight"].shape[0], "block_out_channels": widths,
            "layers_per_block": per, "norm_num_groups": 32}


def vae_to_diffusers(vae: dict[str, torch.Tensor], levels: int, per: int) -> dict[str, torch.Tensor]:
    res = {"nin_shortcut": "conv_shortcut"}
    out = {k: v for k, v in vae.items() if k.split(".")[0] in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        out.update(_rename(vae, f"{part}.conv_in", f"{part}.conv_in"))
        out.update(_rename(vae, f"{part}.conv_out", f"{part}.conv_out"))
        out.update(_rename(vae, f"{part}.norm_out", f"{part}.conv_norm_out"))
        out.update(_rename(vae, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", res))
        out.update(_rename(vae, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", res))
        attn = _rename(vae, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN)
        out.update({k: v[:, :, 0, 0] if v.ndim == 4 else v for k, v in attn.items()})  # 1x1 conv -> Linear
    for i in range(levels):
        out.update(_rename(vae, f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        out.update(_rename(vae, f"decoder.up.{levels - 1 - i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
        for j in range(per + 1):
            if j < per:
                out.update(_rename(vae, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", res))
            out.update(_rename(vae, f"decoder.up.{levels - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", res))
    return out


# ---- the text encoders ------------------------------------------------------------------------------------
_OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf(clip: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """SD2's OpenCLIP text tower -> transformers CLIPTextModel names (without 'text_model.'), and its layer count.
    SD2 conditions on the penultimate layer, so the last resblock is not part of the encoder (diffusers drops
    it too); the fused in_proj splits into q, k, v. text_projection / logit_scale / attn_mask are unused."""
    blocks = sorted({int(m[1]) for k in clip if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    keep = blocks[:-1]
    out = {"embeddings.token_embedding.weight": clip["token_embedding.weight"],
           "embeddings.position_embedding.weight": clip["positional_embedding"],
           "final_layer_norm.weight": clip["ln_final.weight"], "final_layer_norm.bias": clip["ln_final.bias"]}
    for i in keep:
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in _OPENCLIP.items():
            for w in ("weight", "bias"):
                out[f"{dst}{b}.{w}"] = clip[f"{src}{a}.{w}"]
        for w in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), clip[f"{src}attn.in_proj_{w}"].chunk(3)):
                out[f"{dst}self_attn.{name}.{w}"] = part
    known = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
             "logit_scale", "attn_mask"}
    used = known | {k for k in clip if k.startswith("transformer.resblocks.")}  # strict loading checks the rest
    stray = sorted(set(clip) - used)
    if stray:
        raise WrongModelError(f"OpenCLIP text encoder: unexpected tensors {stray[:5]}")
    return out, len(keep)


def _clip_model(text: dict[str, torch.Tensor], layers: int, act: str, where: Path):
    """A transformers CLIPTextModel of the shapes `text` has, loaded strictly with it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from tessera.checkpoint import load_strict

    hidden = text["embeddings.token_embedding.weight"].shape[1]
    config = CLIPTextConfig(vocab_size=text["embeddings.token_embedding.weight"].shape[0], hidden_size=hidden,
                            intermediate_size=text["encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), hidden_act=act,
                            max_position_embeddings=text["embeddings.position_embedding.weight"].shape[0])
    clip = CLIPTextModel(config).eval()
    prefix = "text_model." if next(iter(clip.state_dict())).startswith("text_model.") else ""  # transformers 4 / 5
    return load_strict(clip, {prefix + k: t for k, t in text.items()}, where)


# ---- the whole checkpoint ---------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise InvalidInputError(f"{path}: a pickle checkpoint is not read (it can run code); use its .safetensors "
                                f"or a diffusers folder")
    from tessera.checkpoint import read_safetensors

    return read_safetensors(path)


def load_single_file(path: str | Path, tokenizer: str | Path, prediction: str = "epsilon", device=None, dtype=None):
    """A single-file SD1 (OpenAI CLIP) or SD2 (OpenCLIP) checkpoint as a Tessera SD pipeline; `tokenizer` is a
    CLIP tokenizer folder (a single file carries none); `prediction="v"` for v-models (SD 2.x 768), which
    the tensors cannot reveal."""
    from transformers import CLIPTokenizer

    from tessera.checkpoint import load_strict, on_meta
    from tessera.device import Placement, placement
    from tessera.generators.sd_unet import SDUNet, SDUNetConfig
    from tessera.pipelines.stable_diffusion import SD_DEFAULTS, StableDiffusionPipeline
    from tessera.sampling.diffusion import DiffusionConfig
    from tessera.text.clip import CLIPPromptEncoder
    from tessera.tokenizer.kl import KLAutoencoder, KLAutoencoderConfig

    state = read_checkpoint(path)
    unet, vae, text, openclip = _sub(state, UNET), _sub(state, VAE), _sub(state, CLIP_SD1), _sub(state, OPENCLIP_SD2)
    if not unet or not vae:
        raise WrongModelError(f"{path}: not an LDM Stable Diffusion checkpoint (no {UNET}* or {VAE}* tensors)")
    if not text and not openclip:
        raise WrongModelError(f"{path}: no text encoder ({CLIP_SD1}* or {OPENCLIP_SD2}* tensors)")
    device = device if isinstance(device, Placement) else placement(device, dtype)
    u = unet_structure(unet)
    net = on_meta(lambda: SDUNet(SDUNetConfig(sample_size=64, **u)))
    load_strict(net, unet_to_diffusers(unet, u["layers_per_block"], len(u["block_out_channels"]), u["cross_attention"]),
            Path(path), device.dtype)
    v = vae_structure(vae)
    ae = on_meta(lambda: KLAutoencoder(KLAutoencoderConfig(**v)))
    load_strict(ae, vae_to_diffusers(vae, len(v["block_out_channels"]), v["layers_per_block"]), Path(path))
    if text:  # SD1: OpenAI CLIP ViT-L/14 text, already in transformers' names
        text = {k.removeprefix("text_model."): t for k, t in text.items() if not k.endswith("position_ids")}
        layers = len({k.split(".")[2] for k in text if k.startswith("encoder.layers.")})
        clip = _clip_model(text, layers, "quick_gelu", Path(path))
    else:  # SD2: OpenCLIP ViT-H/14 text
        clip = _clip_model(*openclip_to_hf(openclip), "gelu", Path(path))
    tok = CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    sched = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction=prediction,
                            steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(net, ae, CLIPPromptEncoder(clip, tok, name=str(path)), scheduler=sched,
                                   sampler={**SD_DEFAULTS, "method": "dpmpp_2m"}, device=device)
    pipe.source = str(path)
    return pipe
