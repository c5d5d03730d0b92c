"""Tessera: curate data, train an image tokenizer and generators, upscale, evaluate and serve."""
__version__ = "0.1.0"


def load(path_or_preset, device=None, dtype=None):
    """A model for a model folder or bundled preset ("vq-f8"); a pipeline for a pipeline folder or a
    paradigm name ("ar" | "masked" | "diffusion": the bundled default pipeline).

    device: "cpu" | "cuda" | "cuda:N" | "auto" (None: the CPU for a model, auto for a pipeline). dtype: for
    a pipeline the compute dtype ("auto": bf16 where the hardware has it; Stable Diffusion pipelines also hold
    their weights in it); for a model the dtype its weights are read in (default float32)."""
    from tessera.checkpoint import load_model
    from tessera.device import resolve_device
    from tessera.pipelines.folder import is_pipeline_folder, is_release_pipeline, load_pipeline
    from tessera.registry import paradigms, resolve

    # pipelines: a paradigm, a pipeline folder (Tessera's, diffusers' SD / aMUSEd), a LlamaGen release
    # (c2i_<size>_<res>.pt + vq_ds16_c2i.pt, or t2i + T5), a taming-transformers Net2Net release (configs/ + checkpoints/)
    if str(path_or_preset) in paradigms() or is_pipeline_folder(path_or_preset) or is_release_pipeline(path_or_preset):
        return load_pipeline(path_or_preset, device=device, dtype=dtype)
    from tessera.device import DTYPES
    from tessera.tokenizer.taming import is_release_folder, load_release

    weights = DTYPES["float32"] if dtype in (None, "auto") else DTYPES.get(str(dtype).removeprefix("torch."), dtype)
    if is_release_folder(path_or_preset):  # a taming-transformers first stage (the VQGAN alone)
        return load_release(path_or_preset, weights).to(resolve_device(device or "cpu"))
    return load_model(resolve(path_or_preset), dtype=weights).to(resolve_device(device or "cpu"))


__all__ = ["__version__", "load"]
