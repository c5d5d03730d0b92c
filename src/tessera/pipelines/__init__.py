"""Inference pipelines: one protocol (base.py: encode prompt, generate, decode; diffusers-style call),
a pipeline per paradigm (ar.py, masked.py, diffusion.py), pipeline folders and the one loader
(folder.py), PNG records (records.py), and the system pipeline of `tessera generate` (text2image.py)."""
from tessera.pipelines.base import Pipeline, PipelineOutput, prompt_batch
from tessera.pipelines.folder import is_pipeline_folder, load_pipeline, save_pipeline

__all__ = ["Pipeline", "PipelineOutput", "prompt_batch", "is_pipeline_folder", "load_pipeline", "save_pipeline"]
