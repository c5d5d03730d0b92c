"""The model optimization pipeline (seed 004): `tessera optimize SRC ... -o OUT` writes an optimized model or
pipeline folder and returns a report of what changed. A model reaches production only through the
evaluation gate of `tessera workflow` (train/workflow.py, its `optimize` step).

    int8.py     static int8 of a Stable Diffusion U-Net and its autoencoder's decoder (TAESD or the SD VAE),
                calibrated on held-out prompts
    (train/int8.py: weight-only int8 of a Tessera generator's linear layers, written only where it is faster;
     train/distill.py: few-step distillation of a Tessera diffusion model, sampling/distill.py's targets;
     train/prune.py: structured pruning, nn/prune.py, with a recovery fine-tune)
"""
from __future__ import annotations

from pathlib import Path

from tessera.errors import InvalidInputError


def optimize(src: str, out: str, int8: bool = False, distill_steps: int | None = None, prune: float | None = None,
             data_dir: str | None = None, max_steps: int = 3000, calibration: str | None = None, size: int | None = None,
             steps: int | None = None, overrides: tuple[str, ...] = (), int8_layers: str = "speed",
             cfg: float | None = None) -> dict:
    """One optimization of SRC into OUT (`tessera optimize`); -> its report."""
    if [bool(int8), bool(distill_steps), prune is not None].count(True) != 1:
        raise InvalidInputError("give one of --int8, --distill-steps N or --prune F")
    if prune is not None:
        from tessera.train.prune import prune as run_prune

        return run_prune(src, out, prune, data_dir, max_steps, list(overrides))
    if int8:
        from tessera.optimize.int8 import quantize_sd_folder
        from tessera.pipelines.stable_diffusion import is_diffusers_folder

        if not is_diffusers_folder(src):  # a Tessera generator: weight-only int8 (train/int8.py)
            from tessera.train.int8 import quantize_model

            return quantize_model(src, out, int8_layers)

        prompts = None
        if calibration:
            prompts = [line.strip() for line in Path(calibration).read_text().splitlines() if line.strip()]
            if not prompts:
                raise InvalidInputError(f"--calibration {calibration}: no prompts (one per line)")
        return quantize_sd_folder(src, out, prompts, size, steps, select=int8_layers, cfg=cfg)
    if not data_dir:
        raise InvalidInputError("--distill-steps: give --data (a prepared folder: the student trains on its images)")
    from tessera.train.distill import distill

    return distill(src, out, data_dir, distill_steps, max_steps, list(overrides))
