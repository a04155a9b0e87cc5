"""The Python caption tokenization against CoreNLP's PTBTokenizer as pycocoevalcap runs it,
on the caption fixture (tests/caption_fixture.py: COCO-style references, spoken answers,
mixed scripts, every Unicode punctuation class, the hard ASCII cases), and CIDEr-D with
it against the Java pipeline (pycocoevalcap's PTBTokenizer, then its Cider)."""

from __future__ import annotations

import pytest
from caption_fixture import captions
from ptb_reference import build, digest, stored

from moshivis_mlx.eval.metrics import cider_d
from moshivis_mlx.eval.ptb import tokenize, tokenize_lines

CAPTIONS = captions()


def test_the_fixture_is_large_and_varied():
    assert len(CAPTIONS) >= 1000
    text = "".join(CAPTIONS)
    for ch in "“”‘’—–…£€¢\u00a0\u3000«»「」¿¡·•†‰":  # quotes, dashes, currency, spaces...
        assert ch in text
    assert any("\u0400" <= c <= "\u04ff" for c in text)  # Cyrillic
    assert any("\u4e00" <= c <= "\u9fff" for c in text)  # CJK
    assert any(ord(c) > 0xFFFF for c in text)  # emoji


def test_the_stored_reference_is_of_this_fixture():
    ref = stored()
    assert ref["captions"] == len(CAPTIONS) == len(ref["tokenized"])
    assert ref["sha256"] == digest(CAPTIONS), \
        "the fixture changed: rerun `python tests/ptb_reference.py` where Java is installed"


def test_the_fixture_tokenizes_as_corenlp():
    """Every caption of the fixture, tokenized together as pycocoevalcap does, gives
    CoreNLP's output exactly: 0 differences."""
    ref = stored()["tokenized"]
    ours = tokenize_lines(CAPTIONS)
    differences = [(c, want, got) for c, want, got in zip(CAPTIONS, ref, ours) if want != got]
    assert differences == []


@pytest.mark.parametrize("caption,want", [
    ("“Hi” — she said… it’s £5, €10 or 50¢", "hi she said it 's # 5 $ 10 or 50 cents"),
    ("Lt. Dan in Bldg. 5, no. 9 not no. of", "lt. dan in bldg. 5 no. 9 not no of"),
    ("Show 'em 'cause ol' lemme can't-miss", "show 'em 'cause ol' lem me ca n't miss"),
    ("w/ $3.99/lb a+b=c :) http://x.com/a?b=1 &amp;",
     "w / $ 3.99 / lb a + b = c :-rrb- http://x.com/a?b=1 &"),
    ("a\u00a0b\u2009c\u3000d", "a b c d"),
    ("they'll", "they ll"),  # alone, at the very end of CoreNLP's input
])
def test_hand_picked_cases(caption, want):
    assert tokenize(caption) == want


def test_captions_together_see_the_next_line():
    """A one-letter abbreviation ending a caption loses its period before a caption that
    starts with a word such as "A"; "they'll" ends differently when a line follows."""
    assert tokenize_lines(["the letter B.", "A man", "they'll", "x"]) == \
        ["the letter b", "a man", "they 'll", "x"]
    assert tokenize_lines(["the letter B.", "man"]) == ["the letter b.", "man"]


def _images(n: int = 130):
    """n images with 5 references and a candidate each, from the fixture's captions."""
    refs = [CAPTIONS[6 * i: 6 * i + 5] for i in range(n)]
    hyps = [CAPTIONS[6 * i + 5] for i in range(n)]
    return hyps, refs


def test_cider_d_of_the_fixture_equals_the_stored_java_tokenizations():
    """pycocoevalcap's Cider on our tokens of the fixture equals it on CoreNLP's stored
    tokens (where Java is installed, test_cider_d_equals_the_java_pipeline runs the whole
    Java pipeline on the same images)."""
    from pycocoevalcap.cider.cider import Cider

    n = len(CAPTIONS) // 6

    def score(tokens):
        gts = {i: tokens[6 * i: 6 * i + 5] for i in range(n)}
        res = {i: [tokens[6 * i + 5]] for i in range(n)}
        return Cider().compute_score(gts, res)

    want, want_each = score(stored()["tokenized"])
    got, got_each = score(tokenize_lines(CAPTIONS))
    assert got == pytest.approx(want, abs=1e-9)
    assert list(got_each) == pytest.approx(list(want_each), abs=1e-9)


@pytest.mark.system("java")
def test_the_stored_reference_is_javas():
    """Java's tokenization of the fixture, run now, is the stored one."""
    assert build() == stored()


@pytest.mark.system("java")
def test_cider_d_equals_the_java_pipeline():
    """CIDEr-D on captions full of Unicode punctuation: ours with the Python tokenizer,
    ours with the Java one and pycocoevalcap's own pipeline (PTBTokenizer, then Cider) agree
    to 1e-9."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    hyps, refs = _images()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    want, want_each = Cider().compute_score(gts, res)
    for ptb in ("python", "java"):
        got, got_each = cider_d(hyps, refs, ptb)
        assert got == pytest.approx(100 * want, abs=1e-9), ptb
        assert list(got_each) == pytest.approx([100 * w for w in want_each], abs=1e-9), ptb
