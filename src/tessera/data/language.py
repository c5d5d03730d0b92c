"""Caption language (seed 004: "Handle missing or non-English captions").

Detected with `lingua` (lingua-language-detector): it ships its language models in the wheel (no download),
is deterministic, and is accurate on SHORT text, the form captions take; langdetect is random unless seeded
through global state, and py3langid read 47% of Tux Paint's short English descriptions as another language
(benchmarks/bench_language.py). Its cost: a 96 MB wheel, and ~5-10 s / ~570 MB to load the models of the 28
default languages (once per process: each prepare worker loads its own).

A caption counts as non-English only when the best language beats English by `margin` in lingua's
confidence (default 3x): short captions and proper nouns are ambiguous ("A quetzal."), and a wrong
"non-English" verdict would throw a good caption away. At 3x: 4.3% of English captions misread, 92.9% of the
others found (at 1x: 26% and 99.3%)."""
from __future__ import annotations

import functools

LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "ru", "ja", "zh", "ko", "ar", "pl", "tr", "sv", "da", "fi",
             "cs", "hu", "ro", "el", "he", "hi", "id", "vi", "th", "uk", "fa")


def check_languages(codes: tuple[str, ...]) -> None:
    """ISO 639-1 codes lingua knows, English among them."""
    from lingua import IsoCode639_1

    unknown = [c for c in codes if not hasattr(IsoCode639_1, c.upper())]
    if unknown or "en" not in codes:
        raise ValueError(f"languages {list(codes)}: need ISO 639-1 codes lingua knows, 'en' among them"
                         + (f" (unknown: {unknown})" if unknown else ""))


@functools.lru_cache(maxsize=2)
def detector(languages: tuple[str, ...] = LANGUAGES):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    check_languages(languages)
    langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in languages]
    return LanguageDetectorBuilder.from_languages(*langs).with_preloaded_language_models().build()


def detect(text: str, languages: tuple[str, ...] = LANGUAGES, margin: float = 3.0) -> dict:
    """-> {"language": code, "language_confidence": its confidence, "english_confidence": English's}; the
    language is "en" unless another beats English by `margin`x; None for a caption without letters."""
    values = detector(languages).compute_language_confidence_values(text)
    if not text.strip() or not values or values[0].value == 0:
        return {"language": None, "language_confidence": 0.0, "english_confidence": 0.0}
    conf = {v.language.iso_code_639_1.name.lower(): v.value for v in values}
    top = max(conf, key=conf.get)
    lang = top if top != "en" and conf[top] >= margin * conf.get("en", 0.0) else "en"
    return {"language": lang, "language_confidence": round(conf[lang], 4),
            "english_confidence": round(conf.get("en", 0.0), 4)}
