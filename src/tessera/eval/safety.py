"""`tessera eval safety`: how the prompt-safety check does on prompts it did not train on —
block rate (and category accuracy) on the held-out policy prompts, false positives on the held-out
benign policy prompts and on a benign prompt file (PartiPrompts: 1,632 ordinary prompts)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

DEFAULT_BENIGN = Path("../shared/data/PartiPrompts.tsv")


def evaluate_prompt_safety(model: str = "prompt-safety", benign_file: str | Path | None = None,
                           threshold: float = 0.5) -> dict:
    from tessera.eval.prompts import read_prompts
    from tessera.safety.policy import POLICY_PROMPTS, read_labelled
    from tessera.safety.prompt import PromptSafety

    checker = PromptSafety(model, threshold)
    labels = checker.classifier.config.labels
    texts, y, held = read_labelled(POLICY_PROMPTS, labels)
    idx = [i for i in range(len(texts)) if held[i]]
    verdicts = checker.check([texts[i] for i in idx])
    unsafe = [(labels[int(y[i])], v) for i, v in zip(idx, verdicts) if y[i] > 0]
    benign = [v for i, v in zip(idx, verdicts) if y[i] == 0]
    out = {"model": model, "threshold": threshold,
           "held_out_unsafe": len(unsafe), "block_rate": sum(v.flagged for _, v in unsafe) / max(1, len(unsafe)),
           "category_accuracy": sum(v.category == lab for lab, v in unsafe if v.flagged)
           / max(1, sum(v.flagged for _, v in unsafe)),
           "held_out_benign": len(benign), "held_out_false_positive_rate": sum(v.flagged for v in benign) / max(1, len(benign))}
    path = Path(benign_file) if benign_file else DEFAULT_BENIGN
    if benign_file or path.is_file():
        prompts = [p.prompt for p in read_prompts(path)]
        flagged = [(p, v) for s in range(0, len(prompts), 64)
                   for p, v in zip(prompts[s:s + 64], checker.check(prompts[s:s + 64])) if v.flagged]
        out.update({"benign_file": str(path), "benign_prompts": len(prompts),
                    "benign_false_positive_rate": len(flagged) / len(prompts),
                    "benign_flagged_by_category": dict(Counter(v.category for _, v in flagged)),
                    "benign_flagged_examples": [f"{v.category}: {p}" for p, v in flagged[:15]]})
    return out
