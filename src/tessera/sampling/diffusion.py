"""The diffusion process (seed 004 "Model Development"): noise schedules, the forward process, the
training loss, and DDPM / DDIM samplers as functions over a denoiser callable.

Networks know nothing of this file. A sampler takes `fn(x_t, t) -> model output` (epsilon or v);
`guided_denoiser` builds that callable from a conditional network with classifier-free guidance, the
conditional and unconditional halves in ONE batched forward pass.

Notation (Ho et al. 2020, DDPM; Song et al. 2021, DDIM):
    beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s
    q(x_t | x_0):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                       (DDPM eq. 4)
    v-prediction:  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0                 (Salimans & Ho 2022)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from tessera.config import Config

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B,...], t [B] long) -> output


@dataclasses.dataclass
class DiffusionConfig(Config):
    num_train_timesteps: int = 1000
    schedule: str = "linear"          # linear | cosine
    beta_start: float = 0.00085       # linear schedule ends (Stable Diffusion's latent-space values)
    beta_end: float = 0.012
    prediction: str = "epsilon"       # epsilon | v
    clip_sample: float = 0.0          # clamp predicted x_0 to [-c, c] while sampling (0: off; pixels: 1)

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}: expected 'linear' or 'cosine'")
        if self.prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction={self.prediction!r}: expected 'epsilon' or 'v'")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 2")


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """[T] float32. linear: evenly spaced; cosine: Nichol & Dhariwal 2021 eq. 17, betas capped at 0.999.
    float32 like diffusers, so that checkpoints and samplers agree with it bit for bit (a float64 schedule
    moves x_0 predictions near t = 0 by ~1e-5)."""
    n = cfg.num_train_timesteps
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)


class Schedule:
    """abar_t for every training timestep, and the conversions between (x_t, output) and (x_0, eps)."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.betas = make_betas(cfg)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)  # abar_t, [T] float32

    @property
    def num_steps(self) -> int:
        return self.cfg.num_train_timesteps

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast against `like` [B,...]; t < 0 means 'before the first step' (abar = 1)."""
        t = torch.as_tensor(t).long().cpu()
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones(()))
        a = a.to(like.device, like.dtype)
        return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction == "epsilon":
            return noise
        a = self.abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v

    def split(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output at x_t -> (predicted x_0, predicted eps)."""
        a = self.abar(t, x_t)
        if self.cfg.prediction == "epsilon":
            eps = output
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * output
            eps = a.sqrt() * output + (1 - a).sqrt() * x_t
        return x0, eps

    def inference_timesteps(self, steps: int) -> torch.Tensor:
        """'leading' spacing (DDIM paper, diffusers' default): T//steps apart, from high t to 0."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps={steps} must be between 1 and {self.num_steps}")
        return (torch.arange(steps) * (self.num_steps // steps)).flip(0)


def diffusion_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule, x0: torch.Tensor,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample MSE between the network's output at x_t and its target (eps or v) [B]."""
    b = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.num_steps, (b,), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    out = fn(schedule.add_noise(x0, noise, t), t)
    return F.mse_loss(out.float(), schedule.target(x0, noise, t).float(), reduction="none").flatten(1).mean(1)


# ---- one reverse step ------------------------------------------------------------------------------------
def _clip(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    c = schedule.cfg.clip_sample
    return x0.clamp(-c, c) if c > 0 else x0


def ddpm_step(output: torch.Tensor, t: int, x_t: torch.Tensor, schedule: Schedule, prev_t: int,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral step x_t -> x_{prev_t} from the posterior q(x_prev | x_t, x_0) (DDPM eqs. 6-7), with
    the 'fixed small' variance; for skipped steps the per-step beta is 1 - abar_t / abar_prev."""
    a_t, a_prev = schedule.abar(t, x_t), schedule.abar(prev_t, x_t)
    beta = 1 - a_t / a_prev
    x0, _ = schedule.split(output, x_t, torch.as_tensor(t))
    x0 = _clip(x0, schedule)
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x_t  # eq. 7
    if t == 0 or noise is None:
        return mean
    var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
    return mean + var.sqrt() * noise


def ddim_step(output: torch.Tensor, t: int, x_t: torch.Tensor, schedule: Schedule, prev_t: int, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021 eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16)."""
    a_t, a_prev = schedule.abar(t, x_t), schedule.abar(prev_t, x_t)
    x0, eps = schedule.split(output, x_t, torch.as_tensor(t))
    x0 = _clip(x0, schedule)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        prev = prev + sigma * noise
    return prev


# ---- samplers over a denoiser ---------------------------------------------------------------------------
METHODS = ("ddim", "ddpm")


def sample(fn: Denoiser, schedule: Schedule, x_T: torch.Tensor, steps: int, method: str = "ddim", eta: float = 0.0,
           generator: torch.Generator | None = None,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the reverse process from noise x_T over `steps` timesteps ('leading' spacing).
    method 'ddim' (deterministic at eta=0) or 'ddpm' (ancestral). Returns x_0 (network's space)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    timesteps = schedule.inference_timesteps(steps).tolist()
    stride = schedule.num_steps // steps
    x = x_T
    for i, t in enumerate(timesteps):
        out = fn(x, torch.full((x.shape[0],), t, dtype=torch.long))
        stochastic = method == "ddpm" or eta > 0
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) if stochastic and t > 0 else None
        if method == "ddim":
            x = ddim_step(out, t, x, schedule, t - stride, eta, noise)
        else:
            x = ddpm_step(out, t, x, schedule, t - stride, noise)
        if callback is not None:
            callback(i + 1, len(timesteps))  # steps done
    return x


def guided_denoiser(model, cond: torch.Tensor | None, mask: torch.Tensor | None, cfg_scale: float = 1.0,
                    neg_cond: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None) -> Denoiser:
    """Classifier-free guidance: out = u + s (c - u) (Ho & Salimans 2022), c and u from ONE forward over
    [x; x]. u uses the negative prompt when given, else the model's learned null condition.
    `model(x, t, cond, mask, drop)` is the network's signature (drop [B] bool -> null condition)."""
    if cond is None or cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond, mask, None)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if neg_cond is not None:
            c = _pad_cat(cond, neg_cond)
            m = _pad_cat(mask, neg_mask)
            drop = torch.zeros(2 * b, dtype=torch.bool, device=x.device)
        else:
            c, m = torch.cat([cond, cond]), torch.cat([mask, mask])
            drop = torch.arange(2 * b, device=x.device) >= b  # (2B,) the second half: null condition
        out = model(torch.cat([x, x]), torch.cat([t, t]), c, m, drop)  # (2B, ...)
        c_out, u_out = out.chunk(2)
        return u_out + cfg_scale * (c_out - u_out)

    return fn


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two [B,L,...] prompt tensors along B, right-padding the shorter L with zeros (= masked)."""
    n = max(a.shape[1], b.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, n - x.shape[1]))

    return torch.cat([pad(a), pad(b)])
