"""Few-step distillation of a Tessera diffusion model (`tessera optimize unet-xs --distill-steps 4 --data D -o
OUT`): a training run (`tessera train diffusion` with `task.teacher`, sampling/distill.py) whose student
starts from the teacher's weights, samples on trailing timesteps (its first step at t = T - 1, where x_T is
pure noise) and has guidance folded in (or, with task.student_cfg > 1, samples guided
at that scale). A student given as SRC teaches the next round of progressive distillation (Salimans & Ho
2022: 16 -> 8 -> 4 steps, each round a short jump), at its own steps and guidance. The run folder OUT.run
resumes when the command is re-run."""
from __future__ import annotations

from pathlib import Path

from tessera.errors import InvalidInputError


def distill(src: str, out: str, data_dir: str, student_steps: int, max_steps: int, overrides: list[str]) -> dict:
    from tessera.checkpoint import load_model
    from tessera.registry import resolve
    from tessera.train import runs

    teacher = load_model(resolve(src))
    task = dict(teacher.meta.task) if teacher.meta and teacher.meta.task else {}
    if teacher.kind not in ("unet", "dit") or not teacher.config.conditional:
        raise InvalidInputError(f"{src}: --distill-steps takes a conditional Tessera diffusion model (unet / dit)")
    if task.get("teacher"):  # progressive distillation: a student teaches the next round as it samples
        task = _next_round(src, task, student_steps)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise InvalidInputError(f"-o {out}: not empty")
    run = Path(str(out) + ".run")
    resume = (run / "state.pt").is_file()
    _, caches = runs.prepare_inputs("diffusion", data_dir, task.get("tokenizer", "vq-f8"), task.get("text", "minilm"),
                                    preset=teacher.meta.preset)
    diffusion = {**task.get("diffusion", {}), "timestep_spacing": "trailing"}
    task_updates = {**{k: v for k, v in task.items() if k != "sampler"}, **caches, "latent_scale": task["latent_scale"],
                    "teacher": str(src), "student_steps": int(student_steps), "diffusion": diffusion}
    # lr 1e-5: at 1e-4 a guided round (unet-xs, 16 -> 8) got WORSE at its own objective (benchmarks/RESULTS.md)
    train = ["train.lr=1e-5", "train.warmup_steps=50", "train.ema_decay=0.995", "train.batch_size=32",
             f'train.init="{src}"', *overrides]
    logs = runs.run_training("diffusion", data_dir, str(run), teacher.meta.preset, max_steps, resume, train,
                             teacher.config.to_dict(), task_updates)
    path = runs.export_run(str(run), out, "float16")
    return {"out": str(path), "student_steps": student_steps, "teacher": str(src), "run": str(run), "last": logs}


def _next_round(src: str, task: dict, student_steps: int) -> dict:
    """A distilled student as the teacher: its m-step jumps are its own DDIM steps at its own guidance scale."""
    steps = int(task["student_steps"])
    if student_steps >= steps or steps % student_steps:
        raise InvalidInputError(f"--distill-steps {student_steps}: {src} is a {steps}-step student; the next round "
                                f"needs fewer steps that divide {steps}")
    return {**task, "teacher_steps": steps, "teacher_cfg": float(task.get("student_cfg", 1.0))}
