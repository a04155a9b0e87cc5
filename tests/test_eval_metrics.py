"""The benchmark metrics on fixed examples: the Python caption tokenization against
CoreNLP's own output, CIDEr-D against pycocoevalcap's scorer on CoreNLP-tokenized
captions, VQA accuracy on cases worked by hand from the official rules, the intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moshivis_mlx.eval.metrics import (
    bootstrap_ci,
    caption_core,
    cider_d,
    exact_match,
    normalize_answer,
    score_task,
    vqa_accuracy,
    wilson_ci,
)
from moshivis_mlx.eval.ptb import tokenize

REFERENCE = json.loads((Path(__file__).parent / "data" / "eval" / "ptb_reference.json")
                       .read_text())["captions"]
TOKENIZED = {p["caption"]: p["tokenized"] for p in REFERENCE}


@pytest.mark.parametrize("pair", REFERENCE, ids=lambda p: p["caption"][:30])
def test_tokenization_is_corenlps(pair):
    """Each caption tokenizes exactly as pycocoevalcap's PTBTokenizer (Java) did."""
    assert tokenize(pair["caption"]) == pair["tokenized"]


# Three images with five references each and a hypothesis, from the reference captions.
CAPTIONS = [p["caption"] for p in REFERENCE]
REFS = [CAPTIONS[0:5], CAPTIONS[5:10], CAPTIONS[10:15], CAPTIONS[15:20]]
HYPS = ["A man riding a wave on a surfboard.", "A dog plays with a frisbee in the park!",
        "It's a kitchen with a sink, isn't it?", ""]


def test_cider_d_is_pycocoevalcaps():
    """CIDEr-D of raw captions equals pycocoevalcap's Cider on CoreNLP's tokenization."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [TOKENIZED[r] for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [tokenize(h)] for i, h in enumerate(HYPS)}  # HYPS are not in the fixture
    want, want_each = Cider().compute_score(gts, res)
    got, got_each = cider_d(HYPS, REFS)
    assert got == pytest.approx(100 * want, abs=1e-9)
    np.testing.assert_allclose(got_each, 100 * np.asarray(want_each), atol=1e-9)
    assert got_each[0] > got_each[3] == 0.0  # an empty answer scores 0
    # The hypotheses that are in the fixture too: CoreNLP's tokens, our tokens, same score.
    res_fixture = {i: [TOKENIZED[REFS[(i + 1) % 4][0]]] for i in range(4)}
    want2, _ = Cider().compute_score(gts, res_fixture)
    got2, _ = cider_d([REFS[(i + 1) % 4][0] for i in range(4)], REFS)
    assert got2 == pytest.approx(100 * want2, abs=1e-9)


def test_a_caption_equal_to_a_reference_scores_high():
    refs = [["a man riding a horse", "a person on a horse", "a rider on a brown horse"],
            ["two cats on a sofa", "cats sleeping on a couch", "two kittens on a sofa"],
            ["a red bus on a street", "a double decker bus", "a bus in the city"]]
    score, each = cider_d(["A man riding a horse.", "Two cats on a sofa.", "A pizza."], refs)
    assert each[0] > 100 and each[1] > 100 and each[2] == 0
    assert score == pytest.approx(each.mean())


# -- VQA accuracy: min(#matching humans among the other 9 / 3, 1), averaged over the 10 ------

@pytest.mark.parametrize("prediction,answers,expected", [
    # 3 humans said "2": leaving one of them out leaves 2 (2/3), leaving another out 3 (1)
    ("two", ["2"] * 3 + ["3"] * 7, (3 * 2 / 3 + 7 * 1) / 10),
    ("2", ["2"] * 1 + ["3"] * 9, (1 * 0 + 9 * 1 / 3) / 10),
    ("2", ["2"] * 2 + ["3"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
    ("2", ["2"] * 4 + ["3"] * 6, 1.0),
    ("4", ["2"] * 4 + ["3"] * 6, 0.0),
    # normalisation: case, full stop, article, number word, contraction, punctuation
    ("A dog.", ["dog"] * 10, 1.0),
    ("Three.", ["3"] * 10, 1.0),
    ("None", ["0"] * 10, 1.0),
    ("dont know", ["don't know"] * 5 + ["no"] * 5, 1.0),
    ("Yes!", ["yes"] * 9 + ["no"], 1.0),
    ("no", ["yes"] * 9 + ["no"], 0.1 * 0 + 0.9 * 1 / 3),
    ("3.5", ["3.5"] * 10, 1.0),  # a period before a digit stays
    ("the cat-dog", ["cat dog"] * 2 + ["cat"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
])
def test_vqa_accuracy_by_hand(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_references_normalised_only_when_humans_disagree():
    """vqaEval.py normalises the references only when they differ (the annotation files
    hold normalised answers); the prediction always."""
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0  # "Two" kept, "two" -> "2"
    assert vqa_accuracy("two", ["Two"] * 9 + ["2"]) == 1.0


def test_vqa_lenient_finds_the_answer_in_a_sentence():
    answers = ["2"] * 8 + ["3"] * 2
    assert vqa_accuracy("There are two windows.", answers) == 0.0
    assert vqa_accuracy("There are two windows.", answers, lenient=True) == 1.0
    assert vqa_accuracy("There are twenty windows.", answers, lenient=True) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("It costs 3.5 dollars, right?", "it costs 3.5 dollars right"),
    ("Yes.", "yes"), ("The Cat-dog", "cat dog"), ("An apple and a pear", "apple and pear"),
    ("isnt it", "isn't it"), ("1,000 people", "1000 people"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Great Gatsby.", ["the great gatsby"]) == 1.0
    assert exact_match("It is The Great Gatsby.", ["The Great Gatsby"]) == 0.0
    assert exact_match("It is The Great Gatsby.", ["The Great Gatsby"], lenient=True) == 1.0
    assert exact_match("Gatsby", ["The Great Gatsby"], lenient=True) == 0.0


def test_caption_core():
    assert caption_core("The image shows a man riding a horse. He is wearing a hat.") \
        == "a man riding a horse."
    assert caption_core("Well, I see a red bus on the street!") == "a red bus on the street!"
    assert caption_core("It's a picture of a cat.") == "a cat."
    assert caption_core("A cat.") == "A cat."


def test_intervals():
    lo, hi = wilson_ci(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_ci(0, 20)[0] == pytest.approx(0.0, abs=1e-12) and wilson_ci(0, 20)[1] > 0
    values = np.r_[np.zeros(50), np.ones(50)]
    lo, hi = bootstrap_ci(values)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.05)
    assert bootstrap_ci(values) == bootstrap_ci(values)  # seeded


def test_score_task_reports_raw_and_lenient():
    m = score_task("ocrvqa", ["The title is Dune.", "Dune", "Emma"], [["Dune"]] * 3)
    assert m["score"] == pytest.approx(100 / 3) and m["normalised_score"] == pytest.approx(200 / 3)
    assert m["ci_method"].startswith("Wilson") and m["units"] == "%"
    m = score_task("vqav2", ["two", "red"], [["2"] * 10, ["blue"] * 10])
    assert m["score"] == pytest.approx(50.0) and "bootstrap" in m["ci_method"]
    m = score_task("coco", ["a red house", "a blue square"],
                   [["a red house", "a house"], ["a blue square", "blue"]])
    assert m["metric"] == "CIDEr-D" and m["ci95"][0] <= m["score"] <= m["ci95"][1]
