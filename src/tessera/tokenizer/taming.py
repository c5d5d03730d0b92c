"""taming-transformers' VQGAN (Esser et al. 2021, seed 000's first-stage model) in Tessera, under the
checkpoint's own parameter names, so a released `last.ckpt` loads strictly without renaming:

    image [B,3,H,W] in [-1,1] --encoder--> [B,z,h,w] --quant_conv--> [B,e,h,w] --quantize--> token ids [B,h,w]
    tokens --quantize.embedding--> [B,e,h,w] --post_quant_conv--> --decoder--> image,   h = H / 2^(levels-1)

The encoder / decoder are the convolutional stacks LDM later copied (`down.{i}.block.{j}`,
`down.{i}.attn.{j}` at the resolutions in `attn_resolutions`, `mid.block_1 / attn_1 / block_2`; the decoder
has `num_res_blocks + 1` blocks per level and its `up` list is indexed by level, lowest resolution last);
GroupNorm(32, eps 1e-6) and swish throughout. Quantization is the nearest codebook vector in squared L2
(eq. 2 of the VQGAN paper), no normalisation. A release folder (`configs/model.yaml` + `checkpoints/last.ckpt`)
is read by `load_release` (tensors only; the GAN's `loss.*` tensors are left out, and said so).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.errors import InvalidInputError, WrongModelError
from tessera.registry import register_family


@dataclasses.dataclass
class TamingVQConfig(Config):
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, q / k / v / proj_out as 1x1 convolutions."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        q, k, v = (m(t).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding: (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def level(c_in: int, c_out: int, blocks: int, attention: bool, resnets: str = "block") -> nn.Module:
    """One resolution: `blocks` resnets under the name `resnets` (taming: block, LlamaGen: res), each
    followed by an attention block when `attention`."""
    out = nn.Module()
    setattr(out, resnets, nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(blocks)))
    out.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks)) if attention else nn.ModuleList()
    return out


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def run_level(lvl: nn.Module, h: torch.Tensor, resnets: str = "block") -> torch.Tensor:
    for j, block in enumerate(getattr(lvl, resnets)):
        h = block(h)
        if len(lvl.attn):
            h = lvl.attn[j](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: TamingVQConfig):
        super().__init__()
        mult, res = (1, *cfg.ch_mult), cfg.resolution
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            lvl = level(cfg.ch * mult[i], cfg.ch * m, cfg.num_res_blocks, res in cfg.attn_resolutions)
            if i < len(cfg.ch_mult) - 1:
                lvl.downsample, res = Downsample(cfg.ch * m), res // 2
            self.down.append(lvl)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid, self.norm_out = _mid(c), _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl in self.down:
            h = run_level(lvl, h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: TamingVQConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        up = []
        for i in reversed(range(n)):  # lowest resolution first; stored by level index
            lvl = level(c, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions)
            c = cfg.ch * cfg.ch_mult[i]
            if i > 0:
                lvl.upsample, res = Upsample(c), res * 2
            up.insert(0, lvl)
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            h = run_level(lvl, h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class Quantize(nn.Module):
    """The nearest code of each latent vector by squared L2, |z|^2 + |e|^2 - 2 z.e (taming's and LlamaGen's
    arithmetic); with `l2`, z and the codes are unit-normalised first (LlamaGen's codebook_l2_norm)."""

    def __init__(self, n_embed: int, dim: int, l2: bool = False):
        super().__init__()
        self.embedding, self.l2 = nn.Embedding(n_embed, dim), l2

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.l2 else w  # (n, e)

    def distances(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)[None] - 2 * flat @ codes.t()  # (BHW, n)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,e,h,w] -> ids [B,h,w]."""
        b, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e).float()  # (BHW, e)
        flat = F.normalize(flat, dim=-1) if self.l2 else flat
        return self.distances(flat, self.codebook()).argmin(dim=1).reshape(b, h, w)


class TokenAutoencoder(nn.Module):
    """encode / decode_tokens over `encoder`, `quant_conv`, `quantize` (a Quantize: ids, and the codebook the
    ids decode through), `post_quant_conv`, `decoder`; shared by the taming, LlamaGen and diffusers VQ models."""

    codebook_size: int

    @property
    def factor(self) -> int:
        return self.config.factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] (H, W multiples of `factor`) -> token ids [B,H/f,W/f]."""
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise InvalidInputError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.factor}")
        return self.quantize(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """token ids [B,h,w] -> images [B,3,h*f,w*f] (about [-1,1])."""
        if tokens.min() < 0 or tokens.max() >= self.codebook_size:
            raise InvalidInputError(f"token ids must lie in [0, {self.codebook_size})")
        z = self.quantize.codebook()[tokens].permute(0, 3, 1, 2).to(self.post_quant_conv.weight.dtype)  # (B,e,h,w)
        return self.decoder(self.post_quant_conv(z))


@register_family("taming-vq", TamingVQConfig, role="tokenizer")
class TamingVQGAN(TokenAutoencoder):
    def __init__(self, cfg: TamingVQConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantize = Quantize(cfg.n_embed, cfg.embed_dim)
        self.codebook_size = cfg.n_embed


# ---- a taming-transformers release folder ---------------------------------------------------------------
MODEL_YAML, CHECKPOINT = Path("configs/model.yaml"), Path("checkpoints/last.ckpt")


def is_release_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_YAML).is_file() and (Path(path) / CHECKPOINT).is_file()


def vq_config(params: dict, where: Path) -> TamingVQConfig:
    """A VQModel's `params` (ddconfig, embed_dim, n_embed) -> its config; a wrong one names `where`."""
    try:
        dd = params["ddconfig"]
        if dd.get("double_z", False):
            raise WrongModelError(f"{where}: double_z (a KL first stage), not a VQGAN")
        return TamingVQConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                              attn_resolutions=tuple(dd["attn_resolutions"]), resolution=dd["resolution"],
                              in_channels=dd["in_channels"], out_ch=dd["out_ch"], z_channels=dd["z_channels"],
                              embed_dim=params["embed_dim"], n_embed=params["n_embed"])
    except (KeyError, TypeError, AttributeError) as e:
        raise WrongModelError(f"{where}: not a taming VQModel config ({type(e).__name__}: {e})") from None


def release_model(folder: str | Path) -> dict:
    """The `model` entry of a release's configs/model.yaml ({"target", "params"})."""
    import yaml

    folder = Path(folder)
    try:
        model = yaml.safe_load((folder / MODEL_YAML).read_text())["model"]
        model["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise WrongModelError(f"{folder / MODEL_YAML}: not a taming config ({type(e).__name__}: {e})") from None
    return model


def release_config(folder: Path) -> TamingVQConfig:
    """`model.params` of configs/model.yaml."""
    model = release_model(folder)
    if str(model.get("target", "")).endswith("Net2NetTransformer"):
        raise WrongModelError(f"{folder}: a taming transformer release (VQGAN + GPT): "
                              f"tessera.pipelines.taming.TamingPipeline.from_release reads it")
    return vq_config(model.get("params"), folder / MODEL_YAML)


def load_release(folder: str | Path, dtype: torch.dtype = torch.float32, trust_pickle: bool = False) -> TamingVQGAN:
    """A release folder as a TamingVQGAN, loaded strictly; the discriminator / LPIPS (`loss.*`) are left out."""
    import warnings

    from tessera.checkpoint import load_strict, on_meta, read_pickled_state

    folder = Path(folder)
    cfg = release_config(folder)
    state = read_pickled_state(folder / CHECKPOINT, trust_pickle)
    loss = [k for k in state if k.startswith("loss.")]
    if loss:
        warnings.warn(f"{folder / CHECKPOINT}: {len(loss)} loss.* tensors (the GAN discriminator / LPIPS) left out",
                      stacklevel=2)
    model = load_strict(on_meta(lambda: TamingVQGAN(cfg)), {k: v for k, v in state.items() if not k.startswith("loss.")},
                    folder / CHECKPOINT, dtype)
    return model.eval()
