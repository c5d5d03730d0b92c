"""Prompt safety (seed 004 "Prompt safety service"): reject prompts that violate the usage policy —
violence / gore, sexual content, hate, self-harm, illegal activity — before any generation work runs.

Two signals, both offline:
  * the policy classifier (safety/classifier.py, bundled as `prompt-safety`): softmax over
    benign + the policy categories of the MiniLM sentence vector; flags when a policy class has
    probability >= `threshold`
  * alt-profanity-check (PyPI; ships a linear SVM over words, trained on abusive tweets): flags
    abusive language (category "abusive_language") when its probability >= `profanity_threshold`.
    It unpickles the model inside its own package on import, with the same trust as its code.
"""
from __future__ import annotations

import torch

from tessera.safety import Verdict


class PromptSafety:
    def __init__(self, model: str = "prompt-safety", threshold: float = 0.5, profanity_threshold: float = 0.99,
                 use_profanity: bool = True):
        import tessera
        from tessera.text import load_text_encoder

        for name, v in (("threshold", threshold), ("profanity_threshold", profanity_threshold)):
            if not 0 < v <= 1:
                raise ValueError(f"{name}={v} must be in (0, 1]")
        self.classifier = tessera.load(model).eval()
        self.encoder = load_text_encoder(self.classifier.config.text_encoder)
        self.threshold, self.profanity_threshold = threshold, profanity_threshold
        self.profanity = None
        if use_profanity:
            import profanity_check  # noqa: F401  (fails loudly when the dependency is missing)

            self.profanity = profanity_check.predict_prob

    @torch.no_grad()
    def check(self, prompts: list[str]) -> list[Verdict]:
        labels = self.classifier.config.labels
        probs = self.classifier(self.encoder.encode(prompts).pooled.float()).softmax(-1)  # (B, 1+K)
        abusive = self.profanity(prompts) if self.profanity else [0.0] * len(prompts)
        out = []
        for p, a in zip(probs.tolist(), abusive):
            signals = {lab: round(v, 4) for lab, v in zip(labels[1:], p[1:])}
            signals["abusive_language"] = round(float(a), 4)
            k = max(range(1, len(labels)), key=lambda i: p[i])
            if p[k] >= self.threshold:
                out.append(Verdict(True, labels[k], p[k], signals))
            elif a >= self.profanity_threshold:
                out.append(Verdict(True, "abusive_language", float(a), signals))
            else:
                out.append(Verdict(False, None, max(p[k], float(a)), signals))
        return out
