"""Few-step distillation targets (seed 004 "Model distillation"): a student that samples in S DDIM steps
learns to land, in ONE step, where the guided teacher lands in m = teacher_steps / S steps.

Progressive distillation (Salimans & Ho 2022) halves the steps per round (m = 2); the student jumps the m
teacher steps of its segment at once (any m: 20 -> 4 in one round is m = 5), with classifier-free guidance folded
into the targets (Meng et al. 2023, "On distillation of guided diffusion models", stage 1 + 2 together),
so the student samples without guidance: one network call per step instead of a batch of two; or, with
the student's own guidance scale > 1, the student's guided output is the one fitted (task.student_cfg).
Rounds repeat with the last student as the teacher (train/distill.py).

For a training image x_0, a segment k is drawn per sample; x_{t_k} = q(x_{t_k} | x_0) (DDPM eq. 4); the
teacher's m DDIM steps (eta = 0, Song et al. 2021 eq. 12) from t_k give x'' at t_{k+1}; the student's x_0
target is the one whose single DDIM step from x_{t_k} gives exactly x'' (Salimans & Ho eq. 8-9):

    x0~ = (x'' - (s'' / s) x_t) / (a'' - (s'' / s) a),   a = sqrt(abar), s = sqrt(1 - abar)

(after the last segment abar'' = 1, so x0~ = x''). The loss is the x_0 error weighted by max(SNR, 1)
("truncated SNR weighting", Salimans & Ho section 4).

The trajectory objective (`trajectory_loss`) distills the whole sampling run instead of one segment: from
the same unit noise x_T, the student's S-step run of its own sampler (DDIM or DPM-Solver++, gradients through
every step) learns to end where the teacher's full guided run ends (Luhman & Luhman 2021, "Knowledge
distillation in iterative generative models", eq. 5, here through a multistep solver). Its target is
deterministic given (x_T, prompt): there is no average of next states for the student to blur towards, and
a student started at the teacher's weights starts where the undistilled few-step solver is."""
from __future__ import annotations

import torch

from tessera.sampling.diffusion import Denoiser, Schedule, sample


def segments(schedule: Schedule, student_steps: int, teacher_steps: int) -> torch.Tensor:
    """[S, m + 1] long: row k holds the teacher's timesteps from the student's t_k down to t_{k+1} (-1: past
    the last step, abar = 1). The student's t_k are the schedule's own `student_steps` inference timesteps."""
    if student_steps < 1 or teacher_steps % student_steps:
        raise ValueError(f"teacher_steps={teacher_steps} must be a multiple of student_steps={student_steps}")
    m = teacher_steps // student_steps
    ts = [float(t) for t in schedule.inference_timesteps(student_steps)] + [-1.0]
    rows = [[round(ts[k] - j * (ts[k] - ts[k + 1]) / m) for j in range(m)] + [int(ts[k + 1])]
            for k in range(student_steps)]
    return torch.tensor(rows, dtype=torch.long)


def _ddim_jump(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, abar_next: torch.Tensor) -> torch.Tensor:
    """x at the next timestep, eta = 0 (DDIM eq. 12); per-sample abar_next broadcast like x_t."""
    return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps


@torch.no_grad()
def teacher_jump(teacher: Denoiser, schedule: Schedule, x_t: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """Run the teacher's DDIM steps along `path` [B, m + 1] (per sample) from x_t -> x at path[:, -1]."""
    x = x_t
    for j in range(path.shape[1] - 1):
        t, nxt = path[:, j], path[:, j + 1]
        x0, eps = schedule.split(teacher(x, t.to(x.device)).float(), x, t)
        x = _ddim_jump(x, x0, eps, schedule.abar(nxt, x))
    return x


def x0_target(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor,
              t_next: torch.Tensor) -> torch.Tensor:
    """The x_0 whose single DDIM step from (x_t, t) reaches x_next at t_next (eq. 8-9 above)."""
    a, a_next = schedule.abar(t, x_t), schedule.abar(t_next, x_t)
    ratio = ((1 - a_next) / (1 - a)).sqrt()  # s'' / s
    return (x_next - ratio * x_t) / (a_next.sqrt() - ratio * a.sqrt())


def distill_loss(student: Denoiser, teacher: Denoiser, schedule: Schedule, table: torch.Tensor,
                 x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample truncated-SNR-weighted x_0 error of the student against the teacher's m-step jump [B]."""
    b = x0.shape[0]
    k = torch.randint(0, table.shape[0], (b,), generator=generator)
    path = table[k]  # (B, m + 1)
    t, t_next = path[:, 0], path[:, -1]
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t.to(x0.device))
    target = x0_target(schedule, x_t, t, teacher_jump(teacher, schedule, x_t, path), t_next)
    pred, _ = schedule.split(student(x_t, t.to(x0.device)).float(), x_t, t)
    a = schedule.abar(t, x_t).flatten()
    weight = (a / (1 - a)).clamp(min=1.0)  # max(SNR, 1)
    return weight * (pred - target).pow(2).flatten(1).mean(1)


def trajectory_loss(student: Denoiser, teacher: Denoiser, schedule: Schedule, teacher_schedule: Schedule,
                    steps: tuple[int, int], methods: tuple[str, str], x_T: torch.Tensor) -> torch.Tensor:
    """Per-sample x_0 error [B] of the student's run (steps[0] steps of methods[0] on `schedule`) against
    the teacher's (steps[1] of methods[1] on `teacher_schedule`), both from x_T (module docstring)."""
    with torch.no_grad():
        target = sample(teacher, teacher_schedule, x_T, steps[1], methods[1]).float()
    pred = sample(student, schedule, x_T, steps[0], methods[0]).float()  # backprop through every step
    return (pred - target).pow(2).flatten(1).mean(1)
