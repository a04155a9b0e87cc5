"""The benchmark metrics on fixed examples: the Python caption tokenization against
CoreNLP's own output, CIDEr-D against pycocoevalcap's scorer on CoreNLP-tokenized
captions, VQA accuracy and OCR-VQA exact match on cases worked by hand from the official
rules, the intervals."""

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
    # normalisation (the humans disagree): case, full stop, article, number word,
    # contraction, punctuation
    ("A dog.", ["dog"] * 9 + ["cat"], 1.0),
    ("Three.", ["3"] * 9 + ["4"], 1.0),
    ("None", ["0"] * 9 + ["1"], 1.0),
    ("dont know", ["don't know"] * 5 + ["no"] * 5, 1.0),
    ("Yes!", ["yes"] * 9 + ["no"], 1.0),
    ("no", ["yes"] * 9 + ["no"], 0.1 * 0 + 0.9 * 1 / 3),
    ("3.5", ["3.5"] * 10, 1.0),  # a period before a digit stays
    ("the cat-dog", ["cat dog"] * 2 + ["cat"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
])
def test_vqa_accuracy_by_hand(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_unanimous_answers_leave_the_prediction_as_given():
    """vqaEval.py normalises neither side when all ten humans gave the same string: the
    prediction must then equal it exactly (after stripping whitespace)."""
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, rule="lenient") == 1.0
    assert vqa_accuracy("T-shirt", ["T-shirt"] * 10) == 1.0
    assert vqa_accuracy("T-shirt", ["T-shirt"] * 10, rule="lenient") == 0.0  # "t shirt"
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # newlines, tabs, ends: cleaned
    assert vqa_accuracy("yes", ["yes "] * 10) == 1.0
    # One dissenting human: everything is normalised, "Yes." becomes "yes".
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("T-shirt", ["T-shirt"] * 9 + ["shirt"]) == 1.0  # both "t shirt"


def test_vqa_references_normalised_only_when_humans_disagree():
    """vqaEval.py normalises the references only when they differ (the annotation files
    hold normalised answers); the lenient figure always normalises the prediction."""
    assert vqa_accuracy("two", ["Two"] * 10, rule="lenient") == 0.0  # "Two" kept, "2"
    assert vqa_accuracy("Two", ["Two"] * 10) == 1.0
    assert vqa_accuracy("two", ["Two"] * 9 + ["2"]) == 1.0
    # Three of ten say "2" once "Two" is normalised: (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("2", ["Two"] * 2 + ["2"] + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_lenient_finds_the_answer_in_a_sentence():
    answers = ["2"] * 8 + ["3"] * 2
    assert vqa_accuracy("There are two windows.", answers) == 0.0
    assert vqa_accuracy("There are two windows.", answers, rule="contained") == 1.0
    assert vqa_accuracy("There are twenty windows.", answers, rule="contained") == 0.0
    with pytest.raises(ValueError, match="unknown rule"):
        vqa_accuracy("2", answers, rule="strict")


@pytest.mark.parametrize("text,expected", [
    ("It costs 3.5 dollars, right?", "it costs 3.5 dollars right"),
    ("Yes.", "yes"), ("The Cat-dog", "cat dog"), ("An apple and a pear", "apple and pear"),
    ("isnt it", "isn't it"), ("1,000 people", "1000 people"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction,reference,strict,normalised,contained", [
    ("Dune", "Dune", 1, 1, 1),
    ("dune", "DUNE", 1, 1, 1),  # case
    ("  Dune\n", "Dune", 1, 1, 1),  # surrounding whitespace
    ("Dune.", "Dune", 0, 1, 1),  # punctuation
    ("The Art of War", "Art of War", 0, 1, 1),  # an article
    ("Two", "2", 0, 1, 1),  # a number word
    ("Cant Hurt Me", "Can't Hurt Me", 0, 1, 1),  # a contraction's apostrophe
    ("Spider-Man", "Spider Man", 0, 1, 1),  # a hyphen
    ("Art  of War", "Art of War", 0, 1, 1),  # inner whitespace
    ("It is The Great Gatsby.", "The Great Gatsby", 0, 0, 1),  # inside a sentence
    ("Gatsby", "The Great Gatsby", 0, 0, 0),  # part of the title
    ("", "Dune", 0, 0, 0),
])
def test_ocr_exact_match_by_hand(prediction, reference, strict, normalised, contained):
    assert exact_match(prediction, [reference]) == strict
    assert exact_match(prediction, [reference], rule="strict") == strict
    assert exact_match(prediction, [reference], rule="normalised") == normalised
    assert exact_match(prediction, [reference], rule="contained") == contained


def test_ocr_exact_match_any_reference():
    assert exact_match("emma", ["Dune", "Emma"]) == 1.0
    assert exact_match("Emma.", ["Dune", "Emma"]) == 0.0
    with pytest.raises(ValueError, match="unknown rule"):
        exact_match("Emma", ["Emma"], rule="official")


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
    m = score_task("ocrvqa", ["The title is Dune.", "Dune", "Emma", "dune."], [["Dune"]] * 4)
    assert m["score_name"] == "strict" and m["score"] == pytest.approx(100 / 4)
    assert [(o["name"], o["score"]) for o in m["other_scores"]] == [("normalised", 50.0)]
    assert m["normalised_name"] == "contained answer"
    assert m["normalised_score"] == pytest.approx(75.0)
    assert m["ci_method"].startswith("Wilson") and m["units"] == "%"
    assert m["per_sample"] == [0.0, 100.0, 0.0, 0.0]
    assert m["per_sample_normalised"] == [100.0, 100.0, 0.0, 100.0]
    m = score_task("vqav2", ["two", "red", "Yes."], [["2"] * 10, ["blue"] * 10, ["yes"] * 10])
    assert m["score_name"] == "official rule" and m["score"] == pytest.approx(0.0)
    assert [(o["name"], o["score"]) for o in m["other_scores"]] \
        == [("lenient", pytest.approx(200 / 3))]
    assert m["normalised_name"] == "contained answer"
    assert m["normalised_score"] == pytest.approx(200 / 3) and "bootstrap" in m["ci_method"]
    m = score_task("coco", ["a red house", "a blue square"],
                   [["a red house", "a house"], ["a blue square", "blue"]])
    assert m["metric"] == "CIDEr-D" and m["ci95"][0] <= m["score"] <= m["ci95"][1]
    assert m["score_name"] == "raw" and m["normalised_name"] == "lenient"


def test_results_table_names_every_figure():
    from moshivis_mlx.eval.report import results_table

    m = score_task("vqav2", ["two", "Yes."], [["2"] * 10, ["yes"] * 10])
    m.update(task="vqav2", split="validation", mode="audio", bundle="b", quantization="q8",
             sampling="greedy", samples_scored=2, samples_planned=2, complete=True,
             time_per_sample_s=1.0, stops={"silence": 2}, settings={"silence_s": 2,
                                                                     "max_answer_s": 30})
    table = results_table(m)
    for row in ("| VQA accuracy (official rule) | **0.0** %", "| VQA accuracy (lenient) | 100.0",
                "| VQA accuracy (contained answer) | 100.0", "* Official rule: ",
                "* Lenient: the prediction always normalised", "* Contained answer: "):
        assert row in table, row
