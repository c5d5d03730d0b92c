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


def generated_false_positives(prompt_file: str | Path | None = None, per_paradigm: int = 32,
                              paradigms: tuple[str, ...] = ("ar", "masked", "diffusion"), seed: int = 0,
                              thresholds: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98, 0.99)) -> dict:
    """Harm detection on benign generated images: the bundled pipelines draw the first `per_paradigm`
    prompts of `prompt_file` (PartiPrompts: ordinary prompts) at their native size, one seed each, and
    open_nsfw scores them as `generate` does (before SR). Reports the false-positive rate at each threshold
    and the highest scores with their prompt and seed, so the threshold is chosen from data."""
    import tessera
    from tessera.eval.prompts import read_prompts
    from tessera.safety.image import ImageSafety

    prompt_file = prompt_file or DEFAULT_BENIGN
    prompts = [p.prompt for p in read_prompts(prompt_file)][:per_paradigm]
    detector = ImageSafety(threshold=1.0)
    scores: list[tuple[float, str, str, int]] = []
    for paradigm in paradigms:
        pipe = tessera.load(paradigm)
        for i, prompt in enumerate(prompts):
            image = pipe.run(prompt, pipe.params(seed=seed + i, n=1))[0]
            scores.append((detector.check([image])[0].score, paradigm, prompt, seed + i))
    rate = {f"{t:g}": sum(s >= t for s, *_ in scores) / len(scores) for t in thresholds}
    worst = sorted(scores, reverse=True)[:5]
    return {"benign_generated": len(scores), "prompt_file": str(prompt_file), "false_positive_rate": rate,
            "highest": [{"score": round(s, 4), "paradigm": p, "prompt": q, "seed": k} for s, p, q, k in worst]}
