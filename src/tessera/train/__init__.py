"""Training: one trainer per task (tessera.train.<task>), the run folder and export (runs.py), the workflow."""

TASK_HELP = {  # task -> what `tessera train TASK` does (the CLI's help; importing this loads nothing)
    "tokenizer": "Train the VQ tokenizer on a prepared folder.",
    "ar": "Train the autoregressive generator on cached token grids (+ cached caption embeddings).",
    "masked": "Train the masked generator (Muse / MaskGIT) on cached token grids (+ captions).",
    "masked_sr": "Train Muse's super-resolution transformer: full-size token grids from the half-size ones (+ captions).",
    "diffusion": "Train a diffusion denoiser (DDPM objective) on cached latents (+ captions).",
    "sr": "Train a super-resolution model (L1) on crops of a prepared high-resolution folder.",
    "contrastive": "Train the contrastive image-text model (offline CLIPScore) on a captioned folder."}
