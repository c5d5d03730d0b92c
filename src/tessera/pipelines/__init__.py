"""Inference pipelines: prompt -> image for each generator kind (ar.py, masked.py, diffusion.py), the
`tessera generate` cascade (generate.py) and one loader over all kinds (load.py)."""
from __future__ import annotations


def prompt_batch(prompt: str | list[str], n: int) -> list[str]:
    """One prompt drawn `n` times, or a list of prompts (one image each; `n` is then ignored)."""
    if isinstance(prompt, str):
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        return [prompt] * n
    prompts = list(prompt)
    if not prompts:
        raise ValueError("the prompt list is empty")
    return prompts
