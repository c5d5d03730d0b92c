"""Caption language detection (issue 25) on real short captions: Tux Paint's stamp descriptions, each an
English sentence ("A frog.") followed by its translations (`fr.utf8=Une grenouille.`), so every line has a
known language.

    .venv/bin/python benchmarks/bench_language.py [--stamps /usr/share/tuxpaint/stamps] [--margin 3]
                                                  [--compare-py3langid]

Reports, with data/language.detect's rule (non-English when another language beats English by `margin`):
the false non-English rate on the English lines, and per language of CaptionConfig's default list the rate
at which its lines are found non-English (what recaptioning acts on) and identified exactly."""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path


def read_captions(stamps: Path) -> list[tuple[str, str]]:
    """(language code, caption) of every stamp description line."""
    out = []
    for txt in sorted(stamps.rglob("*.txt")):
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        if not lines or not lines[0].strip():
            continue
        out.append(("en", lines[0].strip()))
        for line in lines[1:]:
            code, eq, text = line.partition(".utf8=")
            if eq and text.strip():
                out.append((code.split("_")[0].split("@")[0], text.strip()))
    return out


def main() -> None:
    from tessera.data.language import LANGUAGES, detect, detector

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stamps", type=Path, default=Path("/usr/share/tuxpaint/stamps"))
    ap.add_argument("--margin", type=float, default=3.0)
    ap.add_argument("--compare-py3langid", action="store_true")
    args = ap.parse_args()
    rows = [(c, t) for c, t in read_captions(args.stamps) if c in LANGUAGES]
    t0 = time.perf_counter()
    detector(LANGUAGES)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = [(c, t, detect(t, LANGUAGES, args.margin)["language"]) for c, t in rows]
    per = (time.perf_counter() - t0) / len(rows)
    by = collections.defaultdict(list)
    for c, t, got in found:
        by[c].append(got)
    english = by.pop("en")
    report = {"captions": len(rows), "load_s": round(load, 1), "ms_per_caption": round(per * 1e3, 3),
              "english": {"n": len(english), "false_non_english": round(sum(g != "en" for g in english) / len(english), 4)},
              "other": {c: {"n": len(g), "non_english": round(sum(x != "en" for x in g) / len(g), 3),
                            "exact": round(sum(x == c for x in g) / len(g), 3)} for c, g in sorted(by.items())}}
    non = [x for g in by.values() for x in g]
    report["all_other"] = {"n": len(non), "non_english": round(sum(x != "en" for x in non) / len(non), 4)}
    if args.compare_py3langid:  # the alternative considered (pip install py3langid): top language != en
        import py3langid

        other = [(c, py3langid.classify(t)[0]) for c, t in rows]
        en = [g for c, g in other if c == "en"]
        rest = [g for c, g in other if c != "en"]
        report["py3langid"] = {"false_non_english": round(sum(g != "en" for g in en) / len(en), 4),
                               "non_english": round(sum(g != "en" for g in rest) / len(rest), 4)}
    misses = [t for c, t, got in found if c == "en" and got != "en"][:12]
    print(json.dumps({**report, "english_read_as_other_e.g.": misses}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
