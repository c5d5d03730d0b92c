"""Training losses of the tokenizer (seed 000 "ML objective and loss function"; VQGAN, seed 003).

    L_G = l_rec * |x - x^|_1 + l_quant * L_quant + l_perc * LPIPS(x, x^) + lambda * l_adv * (-D(x^))
    lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + 1e-6)            (VQGAN eq. 7, adaptive weight)
    L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(x^)))                 (hinge loss)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config


@dataclasses.dataclass
class VQLossConfig(Config):
    rec_loss: str = "l1"            # "l1" | "l2"
    rec_weight: float = 1.0
    quant_weight: float = 1.0
    perceptual_weight: float = 0.1
    perceptual_backbone: str = "open_nsfw"   # "open_nsfw" (ships offline) | "vgg16" (needs weights path) | "none"
    perceptual_weights: str = ""             # path for vgg16 (torchvision state_dict, safetensors)
    disc_weight: float = 0.1
    disc_start: int = 2000          # generator step at which the GAN loss switches on (0 = from the start)
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_max: float = 1e4       # clamp of the adaptive weight (taming-transformers)

    def __post_init__(self):
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"VQLossConfig.rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        if self.perceptual_backbone not in ("open_nsfw", "vgg16", "none"):
            raise ValueError(f"VQLossConfig.perceptual_backbone must be open_nsfw|vgg16|none, "
                             f"got {self.perceptual_backbone!r}")


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a grid of real/fake logits, each seeing one ~70 px receptive field."""

    def __init__(self, in_ch: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False),
                       nn.GroupNorm(min(32, ch * mult), ch * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_value: float) -> torch.Tensor:
    """lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + 1e-6) on the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-6)).clamp(0.0, max_value).detach()


def build_perceptual(cfg: VQLossConfig, pretrained: bool = True) -> nn.Module | None:
    from tessera.tokenizer.perceptual import PerceptualLoss

    if cfg.perceptual_weight == 0 or cfg.perceptual_backbone == "none":
        return None
    if cfg.perceptual_backbone == "vgg16":
        if not cfg.perceptual_weights:
            raise ValueError("perceptual_backbone='vgg16' needs perceptual_weights=PATH to VGG16 safetensors")
        return PerceptualLoss.vgg16(cfg.perceptual_weights)
    return PerceptualLoss.open_nsfw(pretrained=pretrained)


class VQLoss(nn.Module):
    """Generator and discriminator objectives. Holds the discriminator and the frozen perceptual net."""

    def __init__(self, cfg: VQLossConfig, pretrained_perceptual: bool = True):
        super().__init__()
        self.cfg = cfg
        self.perceptual = build_perceptual(cfg, pretrained_perceptual)
        self.discriminator = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers) if cfg.disc_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, qloss: torch.Tensor, step: int,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        x, xrec = x.float(), xrec.float()
        rec = (x - xrec).abs().mean() if c.rec_loss == "l1" else (x - xrec).pow(2).mean()
        logs = {"rec": rec.item(), "quant": qloss.item()}
        nll = c.rec_weight * rec
        if self.perceptual is not None:
            perc = self.perceptual(x, xrec).mean()
            nll = nll + c.perceptual_weight * perc
            logs["perc"] = perc.item()
        loss = nll + c.quant_weight * qloss
        if self.gan_active(step):
            g_loss = -self.discriminator(xrec).float().mean()
            lam = adaptive_weight(nll, g_loss, last_layer, c.adaptive_max) if torch.is_grad_enabled() else 1.0
            loss = loss + c.disc_weight * lam * g_loss
            logs.update(g=float(g_loss.item()), adaptive=float(lam))
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.discriminator(x.detach()).float(), self.discriminator(xrec.detach()).float())
