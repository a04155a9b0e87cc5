"""The benchmarks' metrics: CIDEr-D (COCO), VQA accuracy (VQAv2), exact match (OCR-VQA),
with confidence intervals.

* CIDEr-D is pycocoevalcap's `Cider` scorer itself, on captions tokenized as COCO's
  evaluation does (`ptb.tokenize_lines`, or the Java original with ptb="java": the same
  tokens either way).
* VQA accuracy is the official evaluation's rule (vqaEval.py of the VQA API), quirks
  included: when the ten human answers differ, the prediction and the answers are
  normalised (punctuation, number words -> digits, articles dropped, contractions given
  their apostrophe); when all ten are the same string, nothing is normalised (`Yes.`
  against ten `yes` scores 0). A prediction scores min(#humans who gave it / 3, 1),
  averaged over the 10 subsets of 9 of the 10 human answers. The lenient figure always
  normalises the prediction (a spoken answer comes capitalised and with its full stop).
* OCR-VQA's headline is strict exact match: the prediction and a reference, each
  lower-cased with its surrounding whitespace stripped, are the same string (as OCR-VQA
  is commonly scored, e.g. big_vision's evaluator). Beside it: exact match after the VQA
  normalisation, and the contained answer below.

Every metric also has a variant for conversational answers (the MoshiVis paper's
formatting notes, Appendix B.2): CIDEr-D of the first sentence with the conversational
lead-in ("the image shows", "I see") removed, and for the question answering tasks a
reference counted as given when it appears, word for word, inside the normalised answer.
Reports show the official (raw) score first and name what each other figure changed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from .ptb import java_tokenize, tokenize_lines

# -- VQA answer normalisation (vqaEval.py) -----------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
"""As written in vqaEval.py: '(?!<=' is a look-ahead, not a look-behind, so a period is
removed unless a digit follows it."""
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PERIOD_STRIP_COUNT = re.UNICODE
"""vqaEval.py calls periodStrip.sub('', text, re.UNICODE): the flag lands in `count`, so
at most 32 periods are removed. Kept, so long answers score as the official script does."""


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def clean(text: str) -> str:
    """Newlines and tabs to spaces, stripped (what vqaEval.py does to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it."""
    return process_digit_article(process_punctuation(clean(text)))


def contains(haystack: str, needle: str) -> bool:
    """Whether the normalised `needle` occurs word for word in the normalised `haystack`."""
    if not needle:
        return False
    return f" {needle} " in f" {haystack} "


VQA_RULES = {
    "official": "the official rule (vqaEval.py): answers normalised (punctuation, number "
                "words to digits, articles, contractions) unless all ten humans gave the "
                "same string, then compared as given",
    "lenient": "the prediction always normalised, the human answers as the official rule "
               "treats them",
    "contained": "a human answer counts as given when it occurs word for word inside the "
                 "normalised prediction (conversational answers are sentences)",
}
OCR_RULES = {
    "strict": "the prediction equals a reference, both lower-cased with surrounding "
              "whitespace stripped",
    "normalised": "the prediction equals a reference after the VQA normalisation of both "
                  "(punctuation, number words to digits, articles, contractions)",
    "contained": "a normalised reference occurs word for word inside the normalised "
                 "prediction (conversational answers are sentences)",
}


def _rule(rule: str, rules: dict[str, str]) -> str:
    if rule not in rules:
        raise ValueError(f"unknown rule {rule!r}: one of {', '.join(rules)}")
    return rule


def vqa_accuracy(prediction: str, answers: Sequence[str], rule: str = "official") -> float:
    """VQA accuracy of one prediction against the human answers (normally 10):
    min(#matches among the other 9 / 3, 1), averaged over leaving each one out.

    `rule` (VQA_RULES): "official" is vqaEval.py's, which normalises nothing when all the
    answers are the same string; "lenient" always normalises the prediction; "contained"
    also accepts an answer found inside the prediction.
    """
    _rule(rule, VQA_RULES)
    gts = [clean(a) for a in answers]
    if not gts:
        return 0.0
    disagree = len(set(gts)) > 1
    if disagree:
        gts = [normalize_answer(a) for a in gts]
    pred = normalize_answer(prediction) if disagree or rule != "official" else clean(prediction)
    match = [contains(pred, g) if rule == "contained" else g == pred for g in gts]
    total = 0.0
    for i in range(len(gts)):
        matching = sum(m for j, m in enumerate(match) if j != i)
        total += min(1.0, matching / 3.0)
    return total / len(gts)


def strict_answer(text: str) -> str:
    """An answer as strict exact match compares it: lower-cased, surrounding whitespace
    stripped, nothing else."""
    return text.strip().lower()


def exact_match(prediction: str, answers: Sequence[str], rule: str = "strict") -> float:
    """1 if the prediction matches a reference under `rule` (OCR_RULES), else 0."""
    _rule(rule, OCR_RULES)
    if rule == "strict":
        return float(strict_answer(prediction) in {strict_answer(a) for a in answers})
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if rule == "contained":
        return float(any(contains(pred, r) for r in refs))
    return float(pred in refs)


# -- CIDEr-D -----------------------------------------------------------------------------------

LEAD_INS = [
    r"(?:i think |well,? |so,? |okay,? |oh,? |hmm,? )*",
    r"(?:(?:this|the|that) (?:image|picture|photo|photograph) (?:shows|depicts|features|is of"
    r"|contains)|(?:this|that|it)(?: is|'s) (?:a |an )?(?:picture|photo|image|photograph) of"
    r"|in (?:this|the) (?:image|picture|photo),?(?: there (?:is|are))?"
    r"|i (?:can )?see|there(?: is| are|'s)|it(?: is|'s))? ?",
]
LEAD_IN = re.compile("^" + "".join(LEAD_INS), re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

CAPTION_NORMALISATION = ("first sentence only; leading 'the image shows', 'this is a picture "
                         "of', 'in this image (there is)', 'I see', 'there is/are', 'it is' "
                         "and fillers ('well', 'so', 'I think') removed")


def caption_core(text: str) -> str:
    """The lenient form of a spoken caption: its first sentence without the conversational
    lead-in (CIDEr-D punishes length and words the references never use)."""
    first = SENTENCE_END.split(text.strip(), maxsplit=1)[0] if text.strip() else ""
    core = LEAD_IN.sub("", first).strip()
    return core or first


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]],
            ptb: str = "python") -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D (as COCO reports it, x100) and each sample's score (x100).

    One entry per sample, so the document frequencies count an image once per question
    about it (each image has the same number of questions in Babillage, which leaves the
    IDF unchanged)."""
    from pycocoevalcap.cider.cider import Cider

    n = len(predictions)
    if n == 0:
        return float("nan"), np.zeros(0)
    keys = list(range(n))
    if ptb == "java":
        res = java_tokenize({k: [predictions[k]] for k in keys})
        gts = java_tokenize({k: list(references[k]) for k in keys})
        res = {k: v or [""] for k, v in res.items()}
    else:  # tokenized together, in the same order as the Java tokenizer gets them
        res = {k: [t] for k, t in zip(keys, tokenize_lines([predictions[k] for k in keys]))}
        flat = iter(tokenize_lines([r for k in keys for r in references[k]]))
        gts = {k: [next(flat) for _ in references[k]] for k in keys}
    score, scores = Cider().compute_score(gts, res)
    return 100.0 * float(score), 100.0 * np.asarray(scores, dtype=np.float64)


# -- confidence intervals ------------------------------------------------------------------------

BOOTSTRAP = 1000
CONFIDENCE = 0.95


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap of the mean over samples (a fixed seed: reports reproduce)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # a loop: memory stays flat for 200,000 samples
        means[i] = v[rng.integers(0, len(v), len(v))].mean()
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def wilson_ci(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


# -- one task's score ------------------------------------------------------------------------------

Scorer = Callable[[str, Sequence[str], str], float]

QA_TASKS: dict[str, tuple[str, Scorer, dict[str, str], bool]] = {
    "vqav2": ("VQA accuracy", vqa_accuracy, VQA_RULES, False),
    "ocrvqa": ("exact-match accuracy", exact_match, OCR_RULES, True),
}
"""Per task: the metric, its scorer, its rules (headline first, the contained answer
last) and whether a sample's score is 0 or 1 (a binomial interval)."""


def score_task(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]],
               ptb: str = "python") -> dict:
    """The task's metric, raw and lenient, each with its 95% interval and per-sample values.

    For the question answering tasks the headline (`score`) is the rule published numbers
    use, `normalised_score` the contained answer, and `other_scores` the figures between."""
    n = len(predictions)
    if task == "coco":
        raw, per = cider_d(predictions, references, ptb)
        core = [caption_core(p) for p in predictions]
        norm, per_norm = cider_d(core, references, ptb)
        ci, ci_norm = bootstrap_ci(per), bootstrap_ci(per_norm)
        return {
            "metric": "CIDEr-D", "units": "CIDEr x 100", "samples": n,
            "score": raw, "score_name": "raw", "ci95": list(ci),
            "ci_method": f"percentile bootstrap over samples ({BOOTSTRAP} resamples, IDF "
                         f"of the whole set kept fixed)",
            "tokenizer": "PTBTokenizer (Java)" if ptb == "java" else "Python PTB tokenization",
            "normalised_score": norm, "normalised_name": "lenient",
            "normalised_ci95": list(ci_norm), "normalisation": CAPTION_NORMALISATION,
            "other_scores": [],
            "per_sample": per.tolist(), "per_sample_normalised": per_norm.tolist(),
        }
    if task not in QA_TASKS:
        raise ValueError(f"unknown task {task!r}")
    name, scorer, rules, binary = QA_TASKS[task]
    figures = {rule: _qa_figure(scorer, rule, predictions, references, binary)
               for rule in rules}
    head, *middle, last = rules
    method = ("Wilson score interval (binomial)" if binary
              else f"percentile bootstrap over samples ({BOOTSTRAP} resamples)")
    per, per_norm = figures[head][2], figures[last][2]
    return {
        "metric": name, "units": "%", "samples": n,
        "score": figures[head][0], "score_name": _RULE_NAMES[head],
        "ci95": figures[head][1], "ci_method": method, "answer_normalisation": rules[head],
        "normalised_score": figures[last][0], "normalised_name": _RULE_NAMES[last],
        "normalised_ci95": figures[last][1], "normalisation": rules[last],
        "other_scores": [{"name": _RULE_NAMES[r], "score": figures[r][0], "ci95": figures[r][1],
                          "rule": rules[r]} for r in middle],
        "per_sample": (100.0 * per).tolist(), "per_sample_normalised": (100.0 * per_norm).tolist(),
    }


_RULE_NAMES = {"official": "official rule", "lenient": "lenient", "contained": "contained answer",
               "strict": "strict", "normalised": "normalised"}


def _qa_figure(scorer: Scorer, rule: str, predictions: Sequence[str],
               references: Sequence[Sequence[str]], binary: bool,
               ) -> tuple[float, list[float], np.ndarray]:
    """One rule's mean (%), its 95% interval (%) and the per-sample scores (0..1)."""
    per = np.array([scorer(p, r, rule) for p, r in zip(predictions, references)],
                   dtype=np.float64)
    ci = wilson_ci(per.sum(), len(per)) if binary else bootstrap_ci(per)
    mean = 100.0 * float(per.mean()) if len(per) else float("nan")
    return mean, [100.0 * c for c in ci], per


def running_score(task: str, predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> float:
    """The raw score so far, for the progress bar (CIDEr-D's IDF from the samples done)."""
    if not predictions:
        return float("nan")
    if task == "coco":
        return cider_d(predictions, references)[0] if len(predictions) > 1 else float("nan")
    scorer = vqa_accuracy if task == "vqav2" else exact_match
    return 100.0 * float(np.mean([scorer(p, r) for p, r in zip(predictions, references)]))
