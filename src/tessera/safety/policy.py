"""The labelled policy prompts (`policy_prompts.tsv`: `text`, `label`) the prompt-safety classifier trains
on (`tessera train safety`) and is evaluated on (`tessera eval safety`). The held-out split is a fixed
fifth of the rows chosen by a hash of the text, so it never depends on the file's order."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import torch

POLICY_PROMPTS = Path(__file__).resolve().parent / "policy_prompts.tsv"


def is_held_out(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5 == 0


def read_labelled(path: str | Path, labels: tuple[str, ...]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """-> texts, label ids [N], held-out mask [N]; unknown labels are errors naming the row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: needs 'text' and 'label' columns")
    for i, r in enumerate(rows, start=2):
        if r["label"] not in labels:
            raise ValueError(f"{path}:{i}: label {r['label']!r} is not one of {labels}")
    texts = [r["text"].strip() for r in rows]
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    return texts, y, torch.tensor([is_held_out(t) for t in texts])
