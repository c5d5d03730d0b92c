"""Tessera: curate data, train an image tokenizer and generators, upscale, evaluate and serve."""
__version__ = "0.1.0"


def load(path_or_preset):
    """Rebuild a model from an export folder or a bundled preset name (see `tessera.registry`)."""
    from tessera.registry import load as _load

    return _load(path_or_preset)


__all__ = ["__version__", "load"]
