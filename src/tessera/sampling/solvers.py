"""Samplers over a denoiser that match diffusers' schedulers step for step: DDIM, DDPM, Euler,
Euler-ancestral, DPM-Solver++ (2M) and LCM. Same timesteps and sigmas as their `set_timesteps`, the same
arithmetic in float32 as their `step()`, and the same noise draws in the same order from the caller's
generator, so that a seed reproduces a diffusers image (tests/test_solvers.py checks each against diffusers).

    fn(x_in [B,...], t [B]) -> model output (epsilon, v or x_0 as the schedule's `prediction` says)

DDIM / DDPM / LCM work on the variance-preserving x_t; Euler and Euler-ancestral on the variance-exploding
x_sigma = x_t * sqrt(1 + sigma^2) with sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022), and give
the network x_sigma / sqrt(1 + sigma^2); DPM-Solver++ (Lu et al. 2022, eqs. 9-10: multistep, midpoint)
works on x_t with lambda_t = log(alpha_t / sigma_t). LCM (Luo et al. 2023) applies the consistency
boundary condition c_skip x + c_out x_0 and re-noises to the next timestep.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from tessera.sampling.diffusion import METHODS, Denoiser, Schedule, ddim_step, ddpm_step

SIGMA_METHODS = ("euler", "euler_a", "dpmpp_2m")


@dataclasses.dataclass
class Plan:
    """What `set_timesteps` computes: the network's timestep at each step, the step after it, and for the
    sigma samplers the noise levels (one more than the steps: the last is 0) and the initial noise scale."""
    method: str
    timesteps: np.ndarray              # [N] int64, float32 for euler / euler_a
    prev: list[int]                    # DDIM / DDPM / LCM: the timestep after each step (-1: past the end)
    sigmas: torch.Tensor | None = None  # [N+1] float32
    init_sigma: float = 1.0            # x_T = noise * init_sigma (diffusers' init_noise_sigma)


def plan(schedule: Schedule, steps: int, method: str) -> Plan:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    cfg, n = schedule.cfg, schedule.num_steps
    if method == "lcm":
        return _lcm_plan(schedule, steps)
    if method in ("ddim", "ddpm"):
        t = schedule.inference_timesteps(steps).round().astype(np.int64)
        prev = [int(x) - n // steps for x in t] if method == "ddim" else [*map(int, t[1:]), -1]
        return Plan(method, t, prev)
    extra = 1 if method == "dpmpp_2m" and cfg.timestep_spacing != "trailing" else 0
    t = schedule.inference_timesteps(steps, extra)
    t = t.round().astype(np.int64) if method == "dpmpp_2m" else t.astype(np.float32)
    base = (((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod) ** 0.5).numpy()
    sigmas = torch.from_numpy(np.concatenate([np.interp(t, np.arange(n), base), [0.0]]).astype(np.float32))
    init = 1.0
    if method != "dpmpp_2m":
        top = float(sigmas.max())
        init = top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Plan(method, t, [], sigmas, init)


def _lcm_plan(schedule: Schedule, steps: int) -> Plan:
    """Every (original_inference_steps / steps)-th timestep of the distillation schedule k-1, 2k-1, ..."""
    cfg = schedule.cfg
    origin = np.arange(1, cfg.original_inference_steps + 1) * (schedule.num_steps // cfg.original_inference_steps) - 1
    if not 1 <= steps <= len(origin):
        raise ValueError(f"steps={steps}: LCM takes 1 to {len(origin)} steps (original_inference_steps)")
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    t = origin[::-1][idx].astype(np.int64)
    return Plan("lcm", t, [*map(int, t[1:]), int(t[-1])])


# ---- one step of each sigma sampler ------------------------------------------------------------------------
def _x0_from_sigma(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """x_0 predicted at x_sigma: eps -> x - sigma eps; v -> -sigma/sqrt(1+sigma^2) v + x/(1+sigma^2)."""
    if prediction == "epsilon":
        return x - sigma * output
    if prediction == "v":
        return output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return output


def euler_step(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               prediction: str = "epsilon") -> torch.Tensor:
    """x_{sigma_next} = x + (x - x_0) / sigma * (sigma_next - sigma) (Karras et al. 2022 Alg. 1, no churn)."""
    x = x.float()
    x0 = _x0_from_sigma(output, x, sigma, prediction)
    return (x + (x - x0) / sigma * (sigma_next - sigma)).to(output.dtype)


def euler_ancestral_step(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                         noise: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
    """An Euler step down to sigma_down, then fresh noise of sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    x = x.float()
    x0 = _x0_from_sigma(output, x, sigma, prediction)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    prev = x + (x - x0) / sigma * (sigma_down - sigma)
    return (prev + noise * sigma_up).to(output.dtype)


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def dpm_x0(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
    """DPM-Solver++ works on the data prediction x_0 = (x_t - sigma_t eps) / alpha_t (v: alpha_t x_t - sigma_t v)."""
    alpha_t, sigma_t = _alpha_sigma(sigma)
    if prediction == "epsilon":
        return (x - sigma_t * output) / alpha_t
    if prediction == "v":
        return alpha_t * x - sigma_t * output
    return output


def dpmpp_2m_step(x0: torch.Tensor, x0_last: torch.Tensor | None, x: torch.Tensor, sigma: torch.Tensor,
                  sigma_next: torch.Tensor, sigma_last: torch.Tensor | None = None) -> torch.Tensor:
    """x_t -> x_{t_next} from the data predictions at this step (x0) and the one before (x0_last; None: the
    first-order step, Lu et al. 2022 eq. 9). Second order, midpoint: D1 = (x0 - x0_last) / r0 (eq. 10)."""
    x = x.float()
    alpha_n, sigma_n = _alpha_sigma(sigma_next)
    alpha_s, sigma_s = _alpha_sigma(sigma)
    lam_n, lam_s = torch.log(alpha_n) - torch.log(sigma_n), torch.log(alpha_s) - torch.log(sigma_s)
    h = lam_n - lam_s
    out = (sigma_n / sigma_s) * x - (alpha_n * (torch.exp(-h) - 1.0)) * x0
    if x0_last is not None:
        alpha_l, sigma_l = _alpha_sigma(sigma_last)
        r0 = (lam_s - (torch.log(alpha_l) - torch.log(sigma_l))) / h
        out = out - 0.5 * (alpha_n * (torch.exp(-h) - 1.0)) * ((1.0 / r0) * (x0 - x0_last))
    return out.to(x0.dtype)


def lcm_step(output: torch.Tensor, t: int, x: torch.Tensor, schedule: Schedule, prev_t: int,
             noise: torch.Tensor | None) -> torch.Tensor:
    """denoised = c_skip(t) x + c_out(t) x_0 (sigma_data 0.5, t scaled by timestep_scaling); then, unless
    this is the last step (noise None), re-noised to prev_t: sqrt(abar) denoised + sqrt(1 - abar) noise."""
    cfg = schedule.cfg
    x0, _ = schedule.split(output, x, torch.as_tensor(t))
    if cfg.clip_sample > 0:
        x0 = x0.clamp(-cfg.clip_sample, cfg.clip_sample)
    scaled = torch.tensor(t * cfg.timestep_scaling, dtype=torch.float32)
    c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised
    a_prev = schedule.abar_prev(prev_t, x, cfg.set_alpha_to_one)
    return a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise


# ---- the loop ---------------------------------------------------------------------------------------------
def sample(fn: Denoiser, schedule: Schedule, x_T: torch.Tensor, steps: int, method: str = "ddim", eta: float = 0.0,
           generator: torch.Generator | None = None,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The reverse process from unit noise x_T (scaled here by the plan's init_sigma) over `steps` steps;
    per-step noise is drawn from `generator` where and when diffusers draws it. Returns x_0."""
    p = plan(schedule, steps, method)
    x = x_T * p.init_sigma
    x0_last = None

    def noise_like(v: torch.Tensor) -> torch.Tensor:
        return torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)

    for i, t in enumerate(p.timesteps.tolist()):
        last = i == len(p.timesteps) - 1
        tt = torch.full((x.shape[0],), t, dtype=torch.float32 if method in ("euler", "euler_a") else torch.long,
                        device=x.device)
        if method in SIGMA_METHODS:
            sigma, sigma_next = p.sigmas[i].to(x.device), p.sigmas[i + 1].to(x.device)
        if method in ("euler", "euler_a"):
            out = fn(x / ((sigma**2 + 1) ** 0.5), tt)
            x = euler_step(out, x, sigma, sigma_next, schedule.cfg.prediction) if method == "euler" else \
                euler_ancestral_step(out, x, sigma, sigma_next, noise_like(out), schedule.cfg.prediction)
        elif method == "dpmpp_2m":
            x0 = dpm_x0(fn(x, tt), x, sigma, schedule.cfg.prediction)
            first = i == 0 or last  # diffusers: lower order at the start and at the final (zero) sigma
            x = dpmpp_2m_step(x0, None if first else x0_last, x, sigma, sigma_next,
                              None if first else p.sigmas[i - 1].to(x.device))
            x0_last = x0
        else:
            out = fn(x, tt)
            if method == "ddim":
                x = ddim_step(out, t, x, schedule, p.prev[i], eta, noise_like(out) if eta > 0 else None)
            elif method == "ddpm":
                x = ddpm_step(out, t, x, schedule, p.prev[i], noise_like(out) if t > 0 else None)
            else:
                x = lcm_step(out, t, x, schedule, p.prev[i], None if last else noise_like(out))
        if callback is not None:
            callback(i + 1, len(p.timesteps))  # steps done
    return x
