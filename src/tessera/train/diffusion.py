"""Training task for diffusion denoisers (U-Net or DiT): epsilon- or v-prediction MSE on the forward
process (seed 004), in the tokenizer's latent space (default) or in pixel space for small images;
prompts from the caption-embedding cache, dropped for `cond_drop` of the samples (CFG).

With `teacher` set, the run is few-step distillation instead (sampling/distill.py): the model, started from
the teacher's weights (train.init), learns `student_steps` DDIM steps that each land where the teacher's
guided `teacher_steps / student_steps` steps land; its pipeline then samples with that many steps, unguided, or,
with `student_cfg` > 1, guided at that scale (the guided student's output is what learns the teacher's jump)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.config import Config
from tessera.data.caches import DiffusionData
from tessera.data.captions import trim_padding
from tessera.eval.captions import VAL_TIMESTEPS, diffusion_margin
from tessera.sampling.diffusion import DiffusionConfig, Schedule, diffusion_loss


@dataclasses.dataclass
class DiffusionTaskConfig(Config):
    space: str = "latent"          # latent: the tokenizer's pre-quantization latents; pixel: images
    tokenizer: str = "vq-f8"       # decodes latents at sampling time (latent space)
    latents: str = ""              # DATA/latents/<name> written by the latent cache ('' = the only one)
    text: str = "minilm"           # DATA/text/<name>
    latent_scale: float = 1.0      # x_0 = latents * scale (unit variance; measured by `prepare_diffusion_inputs`)
    cond_drop: float = 0.1
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    val_images: int = 256
    val_timesteps: tuple[int, ...] = VAL_TIMESTEPS
    teacher: str = ""              # few-step distillation of this model ('' = ordinary training)
    teacher_steps: int = 20        # the teacher's DDIM steps the student's steps replace
    teacher_cfg: float = 5.0       # the teacher's guidance scale, folded into the student
    student_steps: int = 4
    student_cfg: float = 1.0       # the student's own guidance scale (1: guidance folded in, one call per step)
    objective: str = "segment"     # segment: each student step lands where the teacher's m steps land (progressive);
    # trajectory: the student's whole run lands where the teacher's whole run lands (sampling/distill.py)
    student_method: str = "ddim"   # the student's sampler (trajectory: any of sampling/solvers.py's deterministic ones)
    sampler: dict[str, Any] = dataclasses.field(default_factory=dict)  # the pipeline's sampling defaults ({}: its own;
    # a student's: its steps at student_cfg, pipelines/folder.py)

    def __post_init__(self):
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"space={self.space!r}: expected 'latent' or 'pixel'")
        if self.student_cfg < 1.0:
            raise ValueError(f"student_cfg={self.student_cfg}: must be >= 1 (1 = guidance folded into the student)")
        if self.objective not in ("segment", "trajectory"):
            raise ValueError(f"objective={self.objective!r}: expected 'segment' or 'trajectory'")
        allowed = ("ddim",) if self.objective == "segment" else ("ddim", "euler", "dpmpp_2m")
        if self.student_method not in allowed:
            raise ValueError(f"student_method={self.student_method!r}: the {self.objective} objective takes {allowed}")


class DiffusionTask:
    def __init__(self, model: nn.Module, data_dir: str | Path, cfg: DiffusionTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        self.schedule = Schedule(cfg.diffusion)
        self.data = DiffusionData(data_dir, cfg.space, cfg.latents, cfg.latent_scale, cfg.text, mc.sample_size,
                                  mc.conditional).check(mc)
        self.dataset = self.data.view("train")
        self.val_idx = self.data.indices("val")[: cfg.val_images]
        self.teacher = self.table = self.teacher_error = self.teacher_schedule = None
        if cfg.teacher:
            self._load_teacher(cfg)

    def _load_teacher(self, cfg: DiffusionTaskConfig) -> None:
        from tessera.checkpoint import load_model
        from tessera.registry import resolve
        from tessera.sampling.distill import segments

        if not self.model.config.conditional:
            raise ValueError("task.teacher: distillation folds guidance in, so it needs a conditional model")
        self.teacher = load_model(resolve(cfg.teacher)).float().eval().requires_grad_(False)
        if self.teacher.config != self.model.config:
            raise ValueError(f"task.teacher={cfg.teacher}: its config differs from the student's (start the "
                             f"student from it: train.init={cfg.teacher})")
        self.table = segments(self.schedule, cfg.student_steps, cfg.teacher_steps)
        task = (self.teacher.meta.task if self.teacher.meta else None) or {}
        # the trajectory target is the teacher's own run: its schedule, and its sampler if it is a student itself
        self.teacher_schedule = Schedule(DiffusionConfig.from_dict(task.get("diffusion", {})))
        self.teacher_method = task.get("student_method", "ddim") if task.get("teacher") else "ddim"

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def losses(self, batch, step: int):
        if self.model.config.conditional:
            x0, cond, mask = batch
            cond, mask = trim_padding(cond, mask)
            if self.teacher is not None:
                return self._distill(x0, cond, mask)
            drop = (torch.rand(x0.shape[0]) < self.cfg.cond_drop).to(x0.device)
            loss = diffusion_loss(lambda x, t: self.model(x, t, cond, mask, drop), self.schedule, x0).mean()
        else:
            loss = diffusion_loss(lambda x, t: self.model(x, t), self.schedule, batch).mean()
        return {"model": loss}, {"loss": float(loss.detach())}

    def _distill(self, x0, cond, mask):
        loss = self._distill_loss(self.model, x0, cond, mask).mean()
        return {"model": loss}, {"loss": float(loss.detach())}

    def _distill_loss(self, model: nn.Module, x0, cond, mask, generator: torch.Generator | None = None):
        """Per-sample distill_loss [B] of `model` as the student (at student_cfg) against the guided teacher."""
        from tessera.sampling.diffusion import guided_denoiser
        from tessera.sampling.distill import distill_loss, trajectory_loss

        self.teacher.to(x0.device)
        teacher = guided_denoiser(self.teacher, cond, mask, self.cfg.teacher_cfg)
        student = guided_denoiser(model, cond, mask, self.cfg.student_cfg)
        if self.cfg.objective == "trajectory":
            x_T = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            return trajectory_loss(student, teacher, self.schedule, self.teacher_schedule,
                                   (self.cfg.student_steps, self.cfg.teacher_steps),
                                   (self.cfg.student_method, self.teacher_method), x_T)
        return distill_loss(student, teacher, self.schedule, self.table, x0, generator)

    def validate(self, model: nn.Module, out_dir: Path, step: int) -> dict[str, float]:
        if not model.config.conditional or len(self.val_idx) < 2:
            return {}
        m = diffusion_margin(model, self.data, self.val_idx, self.schedule, self.cfg.val_timesteps)
        out = {k: v for k, v in m.items() if k != "images"}
        if self.teacher is not None:  # the student's objective on held-out latents, beside its starting point's
            if self.teacher_error is None:  # the teacher's weights sampled as the student is: where it started
                self.teacher_error = self._distill_error(self.teacher)
            out.update(distill_error=self._distill_error(model), distill_error_teacher=self.teacher_error)
        return out

    @torch.no_grad()
    def _distill_error(self, model: nn.Module, n: int = 64) -> float:
        """The distillation loss on the first n held-out latents, the same segments and noise every time (seed 0)."""
        dev = next(model.parameters()).device
        x0, cond, mask = (torch.stack(v).to(dev) for v in zip(*(self.data.item(int(j)) for j in self.val_idx[:n])))
        cond, mask = trim_padding(cond, mask)
        return float(self._distill_loss(model, x0, cond, mask, torch.Generator().manual_seed(0)).mean())


# what `tessera train diffusion` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = DiffusionTask, DiffusionTaskConfig, "unet-s"
