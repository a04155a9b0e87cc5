"""The stored Java tokenization of the caption fixture (tests/caption_fixture.py).

    python tests/ptb_reference.py          # rewrites tests/data/eval/ptb_fixture_reference.json
    python tests/ptb_reference.py --chars  # rewrites moshivis_mlx/eval/ptb_chars.py

runs pycocoevalcap's PTBTokenizer (Stanford CoreNLP through Java, as COCO's evaluation
calls it) on every caption of the fixture and stores its output, so that the lanes
without Java can check the Python tokenizer against it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from caption_fixture import captions  # noqa: E402

PATH = Path(__file__).parent / "data" / "eval" / "ptb_fixture_reference.json"
TOKENIZER = ("Stanford CoreNLP 3.4.1 PTBTokenizer -preserveLines -lowerCase, punctuation "
             "tokens dropped, as pycocoevalcap 1.2 runs it")


def digest(texts: list[str]) -> str:
    """A fingerprint of the fixture, so that a changed generator is caught."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def java_reference(texts: list[str]) -> list[str]:
    from moshivis_mlx.eval.ptb import java_tokenize

    out = java_tokenize({i: [t] for i, t in enumerate(texts)})
    return [out[i][0] for i in range(len(texts))]


def stored() -> dict:
    return json.loads(PATH.read_text(encoding="utf-8"))


def build() -> dict:
    texts = captions()
    return {"tokenizer": TOKENIZER, "captions": len(texts), "sha256": digest(texts),
            "tokenized": java_reference(texts)}


def _java_lines(lines: list[str]) -> list[str]:
    """CoreNLP's PTBTokenizer, with pycocoevalcap's jar and flags, on lines."""
    import os
    import subprocess
    import tempfile

    import pycocoevalcap.tokenizer.ptbtokenizer as p

    jar = Path(p.__file__).parent / p.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".txt") as f:
        f.write("\n".join(lines).encode())
    try:
        out = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", f.name],
                             capture_output=True, check=True).stdout.decode()
    finally:
        os.remove(f.name)
    return out.split("\n")


def char_classes() -> str:
    """ptb_chars.py: every BMP character (but line breaks and surrogates) between two
    words and inside one; a character the word keeps is a letter, one standing alone is a
    symbol, one that vanishes is deleted (three hyphens join words but vanish alone: the
    lexer's hyphen rule knows them)."""
    import textwrap

    breaks = {0x0A, 0x0D, 0x0B, 0x0C, 0x85, 0x2028, 0x2029}
    cps = [c for c in range(0x20, 0x10000) if c not in breaks and not 0xD800 <= c < 0xE000]
    alone = _java_lines([f"a {chr(c)} b" for c in cps])
    inside = _java_lines([f"xy{chr(c)}xy b" for c in cps])
    classes: dict[str, list[int]] = {"LETTERS": [], "SYMBOLS": [], "DELETED": []}
    for c, a, w in zip(cps, alone, inside):
        ch = chr(c)
        hyphen = c in (0x58A, 0x2010, 0x2011)
        if w == f"xy{ch.lower()}xy b" and (c >= 0x80 or ch.isalnum()) and not hyphen:
            classes["LETTERS"].append(c)
        elif a == "a b" and not hyphen:
            classes["DELETED"].append(c)
        elif a == f"a {ch.lower()} b":
            classes["SYMBOLS"].append(c)
    text = ['"""Character classes of CoreNLP 3.4.1\'s PTBTokenizer (its lexer\'s Unicode '
            'tables), as\nmeasured by running it on every character of the Basic Multilingual '
            'Plane: a character\nof LETTERS joins a word, one of SYMBOLS is a token of its own, '
            'one of DELETED is dropped\n(it still separates tokens). Characters outside the BMP '
            'are all dropped. Regenerate with\n`python tests/ptb_reference.py --chars` (needs '
            'Java)."""\n']
    for name, points in classes.items():
        runs: list[list[int]] = []
        for c in points:
            if runs and runs[-1][1] == c - 1:
                runs[-1][1] = c
            else:
                runs.append([c, c])
        enc = " ".join(f"{a:04X}-{b:04X}" if a != b else f"{a:04X}" for a, b in runs)
        text.append(f"{name} = (\n" + "".join(f'    "{line} "\n'
                                                for line in textwrap.wrap(enc, 88)) + ")\n")
    return "\n".join(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--chars"]:
        target = Path(__file__).parents[1] / "moshivis_mlx" / "eval" / "ptb_chars.py"
        target.write_text(char_classes(), encoding="utf-8")
        print(f"wrote {target}")
    else:
        PATH.write_text(json.dumps(build(), ensure_ascii=False, indent=0) + "\n",
                        encoding="utf-8")
        print(f"wrote {PATH}")
