"""Held-out caption test for a text-conditioned AR generator (issue: "the mean token NLL with the TRUE
caption is lower than with a shuffled caption, by a margin reported with its spread")."""
from __future__ import annotations

from pathlib import Path

from tessera.generators.ar import ARTransformer
from tessera.train.ar import ARTask, ARTaskConfig


def caption_margin(model: ARTransformer, data_dir: str | Path, tokens: str | None = None, text: str | None = None,
                   limit: int | None = None, batch_size: int = 32) -> dict:
    """Mean token NLL on the val split with each image's own caption vs. another image's caption.

    `tokens` / `text` name the caches under DATA/tokens and DATA/text; by default those the model was
    trained on (its meta.json), so the test scores the tokenizer and encoder the model expects."""
    if not model.config.conditional:
        raise ValueError("the caption test needs a text-conditioned model (cond_dim > 0)")
    task_meta = getattr(model, "meta", {}).get("task", {})
    cfg = ARTaskConfig(tokens=tokens if tokens is not None else task_meta.get("tokens", ""),
                       text=text if text is not None else task_meta.get("text", "minilm"),
                       val_images=limit if limit is not None else 1 << 30)
    task = ARTask(model, data_dir, cfg)
    out = task.caption_margin(model, batch_size)
    return {"tokens": cfg.tokens, "text": cfg.text, **out}
