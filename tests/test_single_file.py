"""Single-file LDM checkpoints: a small diffusers U-Net, VAE and CLIP text model written in the original LDM
layout (the layout checked against diffusers' own LDM -> diffusers converters), read back into Tessera's
networks strictly, with the same outputs."""
import re

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from test_stable_diffusion import _perturb, byte_level_vocab
from transformers import CLIPTextConfig, CLIPTextModel

from tessera.errors import InvalidInputError
from tessera.pipelines.single_file import load_single_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict, n: int, cross: list[bool]) -> dict:
    """diffusers -> LDM names, written here independently of Tessera's reader (and checked by diffusers)."""
    levels, out = len(cross), {}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    for k, v in sd.items():
        name = None
        for a, b in top.items():
            if k.startswith(a + "."):
                name = b + k[len(a):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if kind == "downsamplers":
                name = f"input_blocks.{(i + 1) * (n + 1)}.0.op.{rest.removeprefix('conv.')}"
            else:
                name = f"input_blocks.{1 + i * (n + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", k):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            if kind == "upsamplers":
                name = f"output_blocks.{i * (n + 1) + n}.{2 if cross[levels - 1 - i] else 1}.{rest}"
            else:
                name = f"output_blocks.{i * (n + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        if ".resnets." in k or "mid_block.resnets" in k:
            for a, b in RESNET.items():
                name = re.sub(rf"\.0\.{a}\.|\.{a}\.", lambda mm: mm[0].replace(a, b), name, count=1)
        out[name] = v
    return out


def vae_to_ldm(sd: dict, levels: int) -> dict:
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        name = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
        if "mid_block.attentions.0." in name:
            part, rest = name.split(".mid_block.attentions.0.")
            for a, b in attn.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
            name, v = f"{part}.mid.attn_1.{rest}", v[:, :, None, None] if v.ndim == 2 else v  # Linear -> 1x1 conv
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
        out[name] = v
    return out


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("single")
    tok = byte_level_vocab()
    tok.save_pretrained(root / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=1, hidden_act="quick_gelu", max_position_embeddings=77)).eval()
    unet = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8))
    vae = _perturb(diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                           down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2))
    ldm_unet = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), 1, [True, False]).items()}
    ldm_vae = {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 2).items()}
    for ours, theirs in ((convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config)), unet.state_dict()),
                         (convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config)), vae.state_dict())):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # the layout is LDM's
    text_sd = {"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()}
    save_file({k: v.contiguous() for k, v in {**ldm_unet, **ldm_vae, **text_sd}.items()}, root / "model.safetensors")
    return root, unet, vae, text


def test_a_single_file_checkpoint_reads_into_tessera_with_the_same_outputs(single_file):
    root, unet, vae, text = single_file
    pipe = load_single_file(root / "model.safetensors", tokenizer=root / "tokenizer", dtype="float32")
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64), torch.tensor([321])
    with torch.no_grad():
        torch.testing.assert_close(pipe.generator(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample,
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pipe.tokenizer.decode_latents(x), vae.decode(x).sample, atol=1e-4, rtol=1e-4)
        ids = pipe.text_encoder.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(pipe.text_encoder.encode(["a cat"]).tokens, text(ids).last_hidden_state)
    assert pipe.generator.config.heads == (8, 8) and not pipe.generator.config.use_linear_projection
    image = pipe.run("a cat", pipe.params(steps=2, seed=1))[0]
    assert image.size == (128, 128)


def test_pickles_and_other_files_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(InvalidInputError, match="pickle"):
        load_single_file(tmp_path / "model.ckpt", tokenizer=tmp_path)
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(Exception, match="not an LDM"):
        load_single_file(tmp_path / "other.safetensors", tokenizer=tmp_path)


def hf_to_openclip(sd: dict, extra_block: dict) -> dict:
    """transformers CLIP text names -> OpenCLIP's (fused q/k/v), plus a last resblock SD2 does not use."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": torch.randn(sd["final_layer_norm.weight"].shape[0], 8), "logit_scale": torch.tensor(4.6)}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers + [len(layers)]:
        src = extra_block if i == len(layers) else {k.removeprefix(f"encoder.layers.{i}."): v for k, v in sd.items()
                                                     if k.startswith(f"encoder.layers.{i}.")}
        for a, b in names.items():
            for w in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{b}.{w}"] = src[f"{a}.{w}"]
        for w in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{w}"] = torch.cat(
                [src[f"self_attn.{n}.{w}"] for n in ("q_proj", "k_proj", "v_proj")])
    return out


def test_an_sd2_single_file_with_openclip_reads_the_same(tmp_path):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    torch.manual_seed(0)
    tok = byte_level_vocab()
    tok.save_pretrained(tmp_path / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=1, hidden_act="gelu", max_position_embeddings=77)
    text = _perturb(CLIPTextModel(config))
    spare = {k.removeprefix("encoder.layers.0.").removeprefix("text_model.encoder.layers.0."): torch.randn_like(v)
             for k, v in text.state_dict().items() if ".layers.0." in k}
    openclip = {"cond_stage_model.model." + k: v for k, v in hf_to_openclip(text.state_dict(), spare).items()}
    theirs = convert_open_clip_checkpoint(text, openclip)  # diffusers reads this layout back to transformers names
    for k, v in text.state_dict().items():
        assert torch.equal(theirs["text_model." + k.removeprefix("text_model.")], v)
    unet = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=(1, 2),
        use_linear_projection=True))
    vae = _perturb(diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                           down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2))
    ldm = {**{"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), 1, [True, False]).items()},
           **{"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), 2).items()}, **openclip}
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "sd2.safetensors")
    pipe = load_single_file(tmp_path / "sd2.safetensors", tokenizer=tmp_path / "tokenizer", prediction="v",
                            dtype="float32")
    assert pipe.generator.config.use_linear_projection and pipe.generator.config.heads == (1, 2)
    assert pipe.scheduler.prediction == "v"
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64), torch.tensor([77])
    with torch.no_grad():
        torch.testing.assert_close(pipe.generator(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample,
                                   atol=1e-4, rtol=1e-4)
        ids = tok(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(pipe.text_encoder.encode(["a cat"]).tokens, text(ids).last_hidden_state)
