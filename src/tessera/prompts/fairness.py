"""Fairness diversification (seed 004: images should not be biased by age, race or gender). For a prompt
that depicts people without saying their skin tone, gender or age, the n images of a request get
attributes drawn in turn from balanced lists (in the training captions' vocabulary: emoji names carry
"light / medium-light / medium / medium-dark / dark skin tone", "man / woman / person", "baby / boy /
girl / older ..."), starting at a seed-dependent offset, so that over many requests each value appears
equally often. Prompts that already name an attribute keep it."""
from __future__ import annotations

import re

SKIN_TONES = ("light skin tone", "medium-light skin tone", "medium skin tone", "medium-dark skin tone", "dark skin tone")
GENDERS = ("man", "woman", "person")
AGES = ("young", "adult", "older")  # "older man / woman / person" is the emoji names' word
NEUTRAL_PEOPLE = {"person", "people", "doctor", "teacher", "worker", "scientist", "farmer", "cook", "chef",
                  "student", "nurse", "pilot", "firefighter", "police", "officer", "artist", "singer", "judge",
                  "astronaut", "runner", "surfer", "swimmer"}
PEOPLE = NEUTRAL_PEOPLE | {"man", "woman", "men", "women", "boy", "girl", "baby", "child", "children", "kid",
                           "kids", "adult", "elder", "grandmother", "grandfather", "king", "queen", "family"}
GENDERED = {"man", "woman", "men", "women", "boy", "girl", "king", "queen", "grandmother", "grandfather", "he",
            "she", "male", "female", "mother", "father"}
SKIN = {"skin", "tone", "black", "white", "asian", "african", "european", "latino", "latina", "indian"}
AGED = {"baby", "child", "children", "kid", "kids", "boy", "girl", "young", "old", "older", "elderly", "elder",
        "adult", "teen", "teenager", "grandmother", "grandfather", "aged", "senior"}


def depicts_people(prompt: str) -> bool:
    return bool(PEOPLE & set(re.findall(r"[a-z]+", prompt.lower())))


def _articles(text: str) -> str:
    """'a' / 'an' before the words diversification inserts, by their first letter ("an older man")."""
    def fix(m: re.Match) -> str:
        art = "an" if m.group(2)[0].lower() in "aeiou" else "a"
        return (art.capitalize() if m.group(1)[0].isupper() else art) + " " + m.group(2)

    return re.sub(r"\b(an?) (young|adult|older|man|woman)\b", fix, text, flags=re.IGNORECASE)


def diversify(prompt: str, n: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """-> n (prompt, changes) pairs; unchanged when the prompt depicts no people."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    if not PEOPLE & words:
        return [(prompt, ())] * n
    out = []
    for i in range(n):
        text, changes = prompt, []
        noun = sorted(NEUTRAL_PEOPLE & words)[0] if NEUTRAL_PEOPLE & words else None
        if noun and not GENDERED & words:
            g = GENDERS[(seed + i) % len(GENDERS)]
            if g != "person":
                text = re.sub(rf"\b{noun}\b", f"{g} {noun}" if noun != "person" else g, text, count=1,
                              flags=re.IGNORECASE)
                noun = g if noun == "person" else f"{g} {noun}"
                changes.append(f"gender: {g}")
        noun = noun or next(iter(sorted({"man", "woman", "men", "women"} & words)), None)
        if noun and not AGED & words:  # every age with every gender over len(GENDERS) * len(AGES) images
            age = AGES[(seed // len(GENDERS) + i // len(GENDERS)) % len(AGES)]
            text = re.sub(rf"\b{noun}\b", f"{age} {noun}", text, count=1, flags=re.IGNORECASE)
            changes.append(f"age: {age}")
        text = _articles(text)
        if not SKIN & words:
            tone = SKIN_TONES[(seed // len(GENDERS) + i) % len(SKIN_TONES)]
            text = f"{text}, {tone}"
            changes.append(f"skin tone: {tone}")
        out.append((text, tuple(changes)))
    return out
