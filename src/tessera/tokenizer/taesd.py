"""TAESD, the tiny latent autoencoder (madebyollin/taesd; diffusers `AutoencoderTiny`): a decoder for
Stable Diffusion's latents about 18x cheaper than the SD VAE's at 512² (REFERENCE 2.2).

    encoder: images [B,3,H,W] in [-1,1] -> /2+1/2 -> conv 3x3 -> per level: (stride-2 conv) + Blocks -> conv
             -> latents [B,4,H/8,W/8] (the diffusion model's own latent space: scale 1, shift 0)
    decoder: latents -> 3 tanh(z/3) -> conv, ReLU -> per level: Blocks, (2x nearest upsample) + conv
             -> images [B,3,H,W] in [0,1] -> *2-1
    Block:   ReLU(conv-ReLU-conv-ReLU-conv (x) + skip(x))

Parameter names are diffusers' (`encoder.layers.{k}`, `decoder.layers.{k}`), so its safetensors load
strictly as they are; `from_taesd_state_dict` maps the original release's `nn.Sequential` indices.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tessera.config import Config, check_diffusers_config
from tessera.registry import register_family


@dataclasses.dataclass
class TinyAutoencoderConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    scaling_factor: float = 1.0   # x_0 of the diffusion model = latents * scale (TAESD: 1)
    shift_factor: float = 0.0

    def __post_init__(self):
        if len(self.encoder_channels) != len(self.encoder_blocks) or len(self.decoder_channels) != len(self.decoder_blocks):
            raise ValueError("encoder/decoder channels and blocks must have one entry per level")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "TinyAutoencoderConfig":
        """An `AutoencoderTiny` config.json; a setting Tessera's network does not have is an error."""
        fixed = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "latent_magnitude": 3,
                 "latent_shift": 0.5, "force_upcast": False}
        names = {"in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
                 "encoder_block_out_channels": "encoder_channels", "decoder_block_out_channels": "decoder_channels",
                 "num_encoder_blocks": "encoder_blocks", "num_decoder_blocks": "decoder_blocks",
                 "scaling_factor": "scaling_factor", "shift_factor": "shift_factor"}
        check_diffusers_config("AutoencoderTiny", config, fixed, {*names, "block_out_channels"})
        if "block_out_channels" in config and tuple(config["block_out_channels"]) != tuple(
                config.get("decoder_block_out_channels", (64, 64, 64, 64))):  # diffusers' copy of the decoder's
            raise ValueError("AutoencoderTiny config: block_out_channels differs from decoder_block_out_channels")
        return cls.from_dict({ours: config[theirs] for theirs, ours in names.items() if theirs in config})


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Int8Block(nn.Module):
    """A decoder Block with static int8 convolutions (`TinyAutoencoder.quantize_int8`): u8 tensors from conv to
    conv, the ReLUs and the residual sum inside oneDNN's kernels (its ReLU modules are gone)."""

    def __init__(self, block: Block):
        super().__init__()
        self.conv = nn.Sequential(block.conv[0], nn.Identity(), block.conv[2], nn.Identity(), block.conv[4])
        self.skip = block.skip  # nn.Identity: a decoder Block keeps its width (Block(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, mid, last = self.conv[0], self.conv[2], self.conv[4]
        x = first.quantize(x)  # u8 on the grid of the block's input (read by `first` and summed by `last`)
        return last(mid(first(x)), accum=x)  # ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x), x overwritten


class TinyEncoder(nn.Module):
    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c, n) in enumerate(zip(cfg.encoder_channels, cfg.encoder_blocks)):
            layers.append(nn.Conv2d(cfg.in_channels, c, 3, padding=1) if i == 0 else
                          nn.Conv2d(c, c, 3, padding=1, stride=2, bias=False))  # (B, c, H/2^i, W/2^i)
            layers += [Block(c, c) for _ in range(n)]
        layers.append(nn.Conv2d(cfg.encoder_channels[-1], cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images.add(1).div(2))  # TAESD works on [0, 1] images


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, cfg.decoder_channels[0], 3, padding=1), nn.ReLU()]
        last = len(cfg.decoder_blocks) - 1
        for i, (c, n) in enumerate(zip(cfg.decoder_channels, cfg.decoder_blocks)):
            layers += [Block(c, c) for _ in range(n)]
            if i < last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))  # (B, c, 2h, 2w)
            layers.append(nn.Conv2d(c, cfg.out_channels if i == last else c, 3, padding=1, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latents / 3) * 3  # TAESD's soft clamp of the latents to (-3, 3)
        return self.layers(x).mul(2).sub(1)


@register_family("taesd", TinyAutoencoderConfig, role="autoencoder")
class TinyAutoencoder(nn.Module):
    """Continuous latents (no codebook): `encode_latents` / `decode_latents` as the diffusion pipeline uses."""

    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TinyEncoder(cfg)
        self.decoder = TinyDecoder(cfg)

    @property
    def factor(self) -> int:
        return self.config.factor

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] (H, W multiples of 8) -> latents [B,4,H/8,W/8]."""
        if images.ndim != 4 or images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(f"images must be [B,C,H,W] with H, W multiples of {self.factor}, got {tuple(images.shape)}")
        return self.encoder(images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,4,h,w] -> images [B,3,8h,8w] in about [-1,1]."""
        return self.decoder(latents)

    def quantize_int8(self, stats: dict[str, dict] | None = None) -> dict:
        """The decoder's convolutions as static int8 ones chained in u8 (`tessera optimize --int8`): each conv
        writes u8 codes on the input grid of the conv that reads its output (through the nearest upsamples,
        which move u8 codes as they are), its ReLU and a Block's residual sum fused. `stats`: the calibration
        (nn/quant.observe_inputs over this module: names as here); None builds the same structure, to be
        loaded strictly. The first conv (4 input channels) stays float; -> {"quantized", "kept"}."""
        from tessera.nn.quant import StaticInt8Conv2d

        layers = self.decoder.layers
        units = [(i, m) for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, Block))][1:]  # after conv 0

        def entry(i: int) -> str:  # the conv that reads unit i's input
            return f"decoder.layers.{i}" + (".conv.0" if isinstance(layers[i], Block) else "")

        def int8(name: str, conv: nn.Conv2d, **fused) -> StaticInt8Conv2d:
            q = StaticInt8Conv2d(conv)
            if stats is not None:
                q.set_from(conv, stats[name]["lo"], stats[name]["hi"])
            return q.fuse(**fused)

        def grid(name: str) -> tuple[float, float]:
            return (0.0, 1.0) if stats is None else (stats[name]["lo"], stats[name]["hi"])

        quantized = []
        for k, (i, m) in enumerate(units):
            out = grid(entry(units[k + 1][0])) if k + 1 < len(units) else None  # the last conv's output is float
            if isinstance(m, nn.Conv2d):
                layers[i] = int8(f"decoder.layers.{i}", m, output_range=out)
                quantized.append(f"decoder.layers.{i}")
                continue
            names = [f"decoder.layers.{i}.conv.{j}" for j in (0, 2, 4)]
            for j, name in zip((0, 2), names):
                m.conv[j] = int8(name, m.conv[j], relu=True, output_range=grid(names[j // 2 + 1]))
            m.conv[4] = int8(names[2], m.conv[4], relu=True, output_range=out, accum_range=grid(names[0]))
            layers[i] = Int8Block(m)
            quantized += names
        return {"quantized": quantized, "kept": {"decoder.layers.0": "4 input channels (a 36-long reduction)"}}


def from_taesd_state_dict(encoder: dict[str, torch.Tensor] | None = None,
                          decoder: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The original release's `taesd_encoder` / `taesd_decoder` weights (nn.Sequential indices; the decoder's
    index 0 is the parameter-free clamp) -> this module's names."""
    out = {f"encoder.layers.{k}": v for k, v in (encoder or {}).items()}
    for k, v in (decoder or {}).items():
        index, rest = k.split(".", 1)
        out[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    return out
