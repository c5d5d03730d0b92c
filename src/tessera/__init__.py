"""Tessera: curate data, train an image tokenizer and generators, upscale, evaluate and serve."""
__version__ = "0.1.0"


def load(path_or_preset, device=None, dtype=None):
    """A model for a model folder or bundled preset ("vq-f8"); a pipeline for a pipeline folder or a
    paradigm name ("ar" | "masked" | "diffusion": the bundled default pipeline).

    device: "cpu" | "cuda" | "cuda:N" | "auto" (None: the CPU for a model, auto for a pipeline). dtype: for
    a pipeline the autocast compute dtype ("auto": bf16 where the hardware has it); for a model the
    weights are cast to it when given."""
    from tessera.checkpoint import load_model
    from tessera.device import resolve_device
    from tessera.pipelines.folder import is_pipeline_folder, load_pipeline
    from tessera.registry import paradigms, resolve

    if str(path_or_preset) in paradigms() or is_pipeline_folder(path_or_preset):
        return load_pipeline(path_or_preset, device=device, dtype=dtype)
    model = load_model(resolve(path_or_preset)).to(resolve_device(device or "cpu"))
    if dtype is not None and dtype != "auto":
        from tessera.device import DTYPES

        model = model.to(DTYPES.get(str(dtype).removeprefix("torch."), dtype))
    return model


__all__ = ["__version__", "load"]
