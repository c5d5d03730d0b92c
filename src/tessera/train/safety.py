"""Train the prompt-policy classifier (safety/classifier.py) on a labelled prompt TSV (`text`, `label`):
full-batch AdamW on the frozen encoder's pooled vectors, class-balanced cross-entropy, on the rows outside
the held-out fifth (`safety/policy.py`)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tessera.safety.classifier import PromptSafetyClassifier, PromptSafetyConfig
from tessera.safety.policy import POLICY_PROMPTS, read_labelled


def accuracy_report(model: PromptSafetyClassifier, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Block rate on unsafe rows (any policy class predicted), false positives on benign rows, and the
    category accuracy on the unsafe rows that were blocked."""
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    unsafe, benign = y > 0, y == 0
    blocked = pred > 0
    return {"unsafe": int(unsafe.sum()), "benign": int(benign.sum()),
            "block_rate": float(blocked[unsafe].float().mean()) if unsafe.any() else float("nan"),
            "false_positive_rate": float(blocked[benign].float().mean()) if benign.any() else float("nan"),
            "category_accuracy": float((pred == y)[unsafe & blocked].float().mean()) if (unsafe & blocked).any()
            else float("nan")}


def train_prompt_safety(path: str | Path = POLICY_PROMPTS, text_encoder: str = "minilm", steps: int = 400,
                        lr: float = 3e-3, weight_decay: float = 1e-2, seed: int = 0,
                        config: PromptSafetyConfig | None = None) -> tuple[PromptSafetyClassifier, dict]:
    from tessera.text import load_text_encoder

    enc = load_text_encoder(text_encoder)
    cfg = config or PromptSafetyConfig(text_encoder=text_encoder, text_dim=enc.dim)
    texts, y, held = read_labelled(path, cfg.labels)
    with torch.no_grad():
        x = torch.cat([enc.encode(texts[s:s + 64]).pooled.float() for s in range(0, len(texts), 64)])
    torch.manual_seed(seed)
    model = PromptSafetyClassifier(cfg)
    train = ~held
    counts = torch.bincount(y[train], minlength=len(cfg.labels)).clamp_min(1).float()
    weight = counts.sum() / (len(counts) * counts)  # class-balanced
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        model.train()
        loss = F.cross_entropy(model(x[train]), y[train], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = {"train": accuracy_report(model, x[train], y[train]), "held_out": accuracy_report(model, x[held], y[held]),
              "rows": len(texts), "held_out_rows": int(held.sum()), "steps": steps, "final_loss": float(loss.detach())}
    return model.eval(), report


def train_and_export(prompt_file: str | None, text_encoder: str, steps: int, out: str | Path) -> dict:
    """`tessera train safety`: train the classifier and export it with its held-out report."""
    from tessera.checkpoint import export_model

    model, report = train_prompt_safety(prompt_file or POLICY_PROMPTS, text_encoder, steps)
    export_model(model, out, {"report": report, "prompts": str(prompt_file or "policy_prompts.tsv")})
    return report
