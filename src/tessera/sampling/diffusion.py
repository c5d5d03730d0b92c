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

import numpy as np
import torch
import torch.nn.functional as F

from tessera.config import Config

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B,...], t [B] long) -> output


SCHEDULES, PREDICTIONS, SPACINGS = ("linear", "scaled_linear", "cosine"), ("epsilon", "v", "sample"), \
    ("leading", "trailing", "linspace")


@dataclasses.dataclass
class DiffusionConfig(Config):
    """The noise schedule and how inference steps are spaced on it; the fields of a diffusers
    `scheduler_config.json` that change the numbers (`from_diffusers` maps one)."""
    num_train_timesteps: int = 1000
    schedule: str = "linear"          # linear | scaled_linear (SD: linear in sqrt(beta)) | cosine
    beta_start: float = 0.00085       # linear schedule ends (Stable Diffusion's latent-space values)
    beta_end: float = 0.012
    prediction: str = "epsilon"       # epsilon | v | sample (x_0)
    clip_sample: float = 0.0          # clamp predicted x_0 to [-c, c] while sampling (0: off; pixels: 1)
    timestep_spacing: str = "leading"  # leading | trailing | linspace (Lin et al. 2024, Table 2)
    steps_offset: int = 0             # added to 'leading' timesteps (SD: 1)
    set_alpha_to_one: bool = True     # DDIM / LCM: abar after the last step is 1 (False: abar_0, as in SD)
    original_inference_steps: int = 50  # LCM: the distillation schedule its steps are taken from
    timestep_scaling: float = 10.0    # LCM: boundary-condition scalings c_skip, c_out

    def __post_init__(self):
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("prediction", self.prediction, PREDICTIONS),
                                     ("timestep_spacing", self.timestep_spacing, SPACINGS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 2")

    @classmethod
    def from_diffusers(cls, config: dict) -> tuple["DiffusionConfig", str | None]:
        """A diffusers scheduler_config.json -> (this config, the sampler its `_class_name` names, or None
        when Tessera has no such sampler, e.g. PNDM). A key that changes the numbers in a way Tessera does
        not implement (karras sigmas, thresholding, trained betas, ...) is an error naming it."""
        return _from_diffusers(cls, config)


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """[T] float32. linear: evenly spaced; cosine: Nichol & Dhariwal 2021 eq. 17, betas capped at 0.999.
    float32 like diffusers, so that checkpoints and samplers agree with it bit for bit (a float64 schedule
    moves x_0 predictions near t = 0 by ~1e-5)."""
    n = cfg.num_train_timesteps
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    if cfg.schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2

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
        if self.cfg.prediction == "sample":
            return x0
        a = self.abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v

    def split(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output at x_t -> (predicted x_0, predicted eps)."""
        a = self.abar(t, x_t)
        if self.cfg.prediction == "epsilon":
            eps = output
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        elif self.cfg.prediction == "sample":
            x0 = output
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        else:
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * output
            eps = a.sqrt() * output + (1 - a).sqrt() * x_t
        return x0, eps

    def abar_prev(self, prev_t: int, like: torch.Tensor, final_one: bool) -> torch.Tensor:
        """abar at the step after t; past the last step (prev_t < 0) 1, or abar_0 when `final_one` is False
        (diffusers' `final_alpha_cumprod` of DDIM / LCM with set_alpha_to_one=False)."""
        if prev_t >= 0 or final_one:
            return self.abar(prev_t, like)
        return self.abar(0, like)

    def inference_timesteps(self, steps: int, extra: int = 0) -> np.ndarray:
        """The `steps` timesteps from high t to low, spaced as the config says (diffusers' set_timesteps):
        leading: T//steps apart from 0, + steps_offset; trailing: T/steps apart ending at T-1; linspace: from
        0 to T-1. float64 (linspace can fall between integers). `extra` spaces steps+extra points and keeps
        the first `steps` (DPM-Solver spaces N+1 points)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps={steps} must be between 1 and {self.num_steps}")
        n, total = self.num_steps, steps + extra
        if self.cfg.timestep_spacing == "leading":
            t = (np.arange(0, total) * (n // total)).round()[::-1] + self.cfg.steps_offset
        elif self.cfg.timestep_spacing == "trailing":
            t = np.arange(n, 0, -n / steps).round() - 1
        else:
            t = np.linspace(0, n - 1, total)[::-1]
        return t[:steps].copy()


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
    alpha = a_t / a_prev  # the step's alpha; 1 - (1 - alpha) would lose it where abar_t is tiny
    beta = 1 - alpha
    x0, _ = schedule.split(output, x_t, torch.as_tensor(t))
    x0 = _clip(x0, schedule)
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * x_t  # eq. 7
    if t == 0 or noise is None:
        return mean
    var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
    return mean + var.sqrt() * noise


def ddim_step(output: torch.Tensor, t: int, x_t: torch.Tensor, schedule: Schedule, prev_t: int, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021 eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16). Past the last
    step abar_prev is 1, or abar_0 with set_alpha_to_one=False (Stable Diffusion's configs)."""
    a_t, a_prev = schedule.abar(t, x_t), schedule.abar_prev(prev_t, x_t, schedule.cfg.set_alpha_to_one)
    x0, eps = schedule.split(output, x_t, torch.as_tensor(t))
    x0 = _clip(x0, schedule)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        prev = prev + sigma * noise
    return prev


# ---- samplers over a denoiser ---------------------------------------------------------------------------
METHODS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "lcm")


def sample(fn: Denoiser, schedule: Schedule, x_T: torch.Tensor, steps: int, method: str = "ddim", eta: float = 0.0,
           generator: torch.Generator | None = None,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the reverse process from unit noise x_T over `steps` steps with one of METHODS (ddim is
    deterministic at eta=0); timesteps spaced as the schedule's config says. Returns x_0 (network's space).
    The samplers, matching diffusers' schedulers step for step, are in `sampling/solvers.py`."""
    from tessera.sampling import solvers

    return solvers.sample(fn, schedule, x_T, steps, method, eta, generator, callback)


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


# ---- diffusers scheduler configs ------------------------------------------------------------------------
_CLASSES = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
            "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpmpp_2m",
            "LCMScheduler": "lcm", "PNDMScheduler": None}
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
_COPIED = ("num_train_timesteps", "beta_start", "beta_end", "timestep_spacing", "steps_offset", "set_alpha_to_one",
           "original_inference_steps", "timestep_scaling")
# keys whose value must be the one Tessera implements (another value would change the numbers)
_REQUIRED = {"trained_betas": None, "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
             "use_beta_sigmas": False, "use_flow_sigmas": False, "rescale_betas_zero_snr": False,
             "interpolation_type": "linear", "final_sigmas_type": "zero", "timestep_type": "discrete",
             "variance_type": ("fixed_small", None), "solver_order": 2, "algorithm_type": "dpmsolver++",
             "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
             "lambda_min_clipped": float("-inf"), "use_lu_lambdas": False, "sigma_min": None, "sigma_max": None,
             "use_dynamic_shifting": False}
_IGNORED = ("_class_name", "_diffusers_version", "_use_default_values", "skip_prk_steps", "clip_sample_range",
            "dynamic_thresholding_ratio", "sample_max_value", "prediction_type", "beta_schedule", "clip_sample",
            "flow_shift", "time_shift_type")  # read above, or inert (flow keys: use_flow_sigmas is required False)


def _from_diffusers(cls, config: dict) -> tuple[DiffusionConfig, str | None]:
    name = config.get("_class_name")
    if name not in _CLASSES:
        raise ValueError(f"scheduler _class_name={name!r}: Tessera reads {sorted(_CLASSES)}")
    unknown = sorted(set(config) - set(_COPIED) - set(_REQUIRED) - set(_IGNORED))
    if unknown:
        raise ValueError(f"{name} config: unknown key(s) {unknown}")
    for key, want in _REQUIRED.items():
        allowed = want if isinstance(want, tuple) else (want,)
        if key in config and config[key] not in allowed and not (key in ("sigma_min", "sigma_max")
                                                                  and config[key] is None):
            raise ValueError(f"{name} config: {key}={config[key]!r} is not implemented (Tessera: {allowed[0]!r})")
    for key, table in (("beta_schedule", _BETAS), ("prediction_type", _PREDICTIONS)):
        if config.get(key, next(iter(table))) not in table:
            raise ValueError(f"{name} config: {key}={config[key]!r}: expected one of {sorted(table)}")
    lcm = _CLASSES[name] == "lcm"  # diffusers' per-class defaults for the keys a config leaves out
    defaults = {"beta_start": 0.00085 if lcm else 0.0001, "beta_end": 0.012 if lcm else 0.02,
                "timestep_spacing": "linspace" if _CLASSES[name] in ("euler", "euler_a", "dpmpp_2m") else "leading"}
    kw = {**defaults, **{k: config[k] for k in _COPIED if k in config}}
    clip = config.get("clip_sample", _CLASSES[name] in ("ddim", "ddpm"))
    return cls(schedule=_BETAS[config.get("beta_schedule", "scaled_linear" if lcm else "linear")],
               prediction=_PREDICTIONS[config.get("prediction_type", "epsilon")],
               clip_sample=float(config.get("clip_sample_range", 1.0)) if clip else 0.0, **kw), _CLASSES[name]
