"""Tessera's samplers against diffusers' schedulers, configured from the same scheduler_config.json: the
same timesteps, the same network input at every step and the same result, with the same seed (x_T and
the per-step noise drawn from one generator, as a diffusers pipeline does)."""
import inspect

import diffusers
import numpy as np
import pytest
import torch

from tessera.sampling import solvers
from tessera.sampling.diffusion import DiffusionConfig, Schedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CASES = [  # (diffusers class, config, steps, eta)
    ("DDIMScheduler", {**SD, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}, 20, None),  # SD1
    ("DDIMScheduler", {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
                       "clip_sample": False}, 4, None),                                                 # SD2-v
    ("DDIMScheduler", {"timestep_spacing": "linspace"}, 7, 1.0),
    ("DDPMScheduler", {**SD, "steps_offset": 1, "clip_sample": False}, 10, None),
    ("DDPMScheduler", {"timestep_spacing": "trailing", "beta_schedule": "squaredcos_cap_v2"}, 6, None),
    ("EulerDiscreteScheduler", {**SD, "timestep_spacing": "trailing", "steps_offset": 1}, 1, None),    # SD-Turbo
    ("EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 12, None),
    ("EulerDiscreteScheduler", {**SD, "prediction_type": "v_prediction"}, 9, None),
    ("EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 10, None),
    ("EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": "trailing"}, 3, None),
    ("DPMSolverMultistepScheduler", {**SD}, 20, None),
    ("DPMSolverMultistepScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 8, None),
    ("DPMSolverMultistepScheduler", {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 5, None),
    ("DPMSolverMultistepScheduler", {**SD}, 1, None),
    ("LCMScheduler", {**SD}, 4, None),
    ("LCMScheduler", {**SD, "set_alpha_to_one": False, "timestep_spacing": "trailing"}, 1, None),
]
SHAPE = (2, 4, 8, 8)


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a network: the same on both sides, so any difference is the sampler's."""
    t = t.float().reshape(-1, 1, 1, 1)
    return 0.6 * torch.tanh(x) + 0.2 * torch.sin(t / 97.0) + 0.05 * x.mean(dim=(1, 2, 3), keepdim=True)


def run_diffusers(name: str, config: dict, steps: int, eta, seed: int):
    sched = getattr(diffusers, name).from_config(config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    inputs, params = [], inspect.signature(sched.step).parameters
    kw = {**({"generator": g} if "generator" in params else {}), **({"eta": eta} if eta is not None else {})}
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        inputs.append(inp)
        x = sched.step(fake_unet(inp, t.expand(SHAPE[0])), t, x, **kw).prev_sample
    return x, inputs, sched.timesteps.numpy()


def run_tessera(name: str, config: dict, steps: int, eta, seed: int):
    cfg, method = DiffusionConfig.from_diffusers({"_class_name": name, **config})
    schedule = Schedule(cfg)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(SHAPE, generator=g)
    inputs = []

    def fn(x, t):
        inputs.append(x)
        return fake_unet(x, t)

    x = solvers.sample(fn, schedule, x_T, steps, method, eta or 0.0, generator=g)
    return x, inputs, solvers.plan(schedule, steps, method).timesteps


@pytest.mark.parametrize("name,config,steps,eta", CASES, ids=[f"{c[0][:-9]}-{i}" for i, c in enumerate(CASES)])
def test_every_step_equals_diffusers(name, config, steps, eta):
    want, want_inputs, want_t = run_diffusers(name, config, steps, eta, seed=3)
    got, got_inputs, got_t = run_tessera(name, config, steps, eta, seed=3)
    np.testing.assert_allclose(got_t.astype(np.float64), want_t.astype(np.float64), rtol=0, atol=1e-4)
    assert len(got_inputs) == len(want_inputs) == steps
    for i, (a, b) in enumerate(zip(got_inputs, want_inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"network input of step {i}: {m}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_different_seed_changes_the_stochastic_samplers():
    name, config = "EulerAncestralDiscreteScheduler", {**SD}
    a, _, _ = run_tessera(name, config, 4, None, seed=3)
    b, _, _ = run_tessera(name, config, 4, None, seed=4)
    assert (a - b).abs().max() > 1e-2


def test_scheduler_configs_that_would_change_the_numbers_are_refused():
    ok, method = DiffusionConfig.from_diffusers({"_class_name": "PNDMScheduler", **SD, "skip_prk_steps": True,
                                                 "steps_offset": 1, "set_alpha_to_one": False})
    assert method is None and ok.schedule == "scaled_linear" and ok.steps_offset == 1
    for bad, needle in (({"use_karras_sigmas": True}, "use_karras_sigmas"), ({"thresholding": True}, "thresholding"),
                        ({"trained_betas": [0.1, 0.2]}, "trained_betas"), ({"shiny": 1}, "unknown key"),
                        ({"beta_schedule": "sigmoid"}, "beta_schedule"), ({"algorithm_type": "sde-dpmsolver++"},
                                                                            "algorithm_type")):
        with pytest.raises(ValueError, match=needle):
            DiffusionConfig.from_diffusers({"_class_name": "DPMSolverMultistepScheduler", **bad})
    with pytest.raises(ValueError, match="_class_name"):
        DiffusionConfig.from_diffusers({"_class_name": "UniPCMultistepScheduler"})
