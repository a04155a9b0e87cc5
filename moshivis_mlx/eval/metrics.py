"""The benchmarks' metrics: CIDEr-D (COCO), VQA accuracy (VQAv2), exact match (OCR-VQA),
with confidence intervals.

* CIDEr-D is pycocoevalcap's `Cider` scorer itself, on captions tokenized as COCO's
  evaluation does (`ptb.tokenize`, or the Java original with ptb="java").
* VQA accuracy follows the official evaluation (vqaEval.py of the VQA API): the answer is
  normalised (punctuation, number words -> digits, articles dropped, contractions given
  their apostrophe), and scores min(#humans who gave it / 3, 1), averaged over the 10
  subsets of 9 of the 10 human answers. One deviation: the prediction is always normalised
  (vqaEval.py skips that when all ten humans agree; EvalAI's server, which scores the test
  sets, always normalises), because a spoken answer always comes capitalised and with its
  full stop.
* OCR-VQA is exact match after the same normalisation.

Every metric also has a lenient variant for conversational answers (the MoshiVis paper's
formatting notes, Appendix B.2): CIDEr-D of the first sentence with the conversational
lead-in ("the image shows", "I see") removed, and for the question answering tasks a
reference counted as given when it appears, word for word, inside the normalised answer.
Reports show the raw score first and name what the lenient one changed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from .ptb import java_tokenize, tokenize

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


def vqa_accuracy(prediction: str, answers: Sequence[str], lenient: bool = False) -> float:
    """The official VQA accuracy of one prediction against the human answers (normally
    10): min(#matches among the other 9 / 3, 1), averaged over leaving each one out.

    References are normalised as vqaEval.py does (only when the humans disagree: the
    annotation files hold normalised answers); the prediction always (see the module
    docstring). `lenient`: a human answer matches when it occurs inside the prediction.
    """
    gts = [clean(a) for a in answers]
    if not gts:
        return 0.0
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
    pred = normalize_answer(prediction)
    match = [contains(pred, g) if lenient else g == pred for g in gts]
    total = 0.0
    for i in range(len(gts)):
        matching = sum(m for j, m in enumerate(match) if j != i)
        total += min(1.0, matching / 3.0)
    return total / len(gts)


def exact_match(prediction: str, answers: Sequence[str], lenient: bool = False) -> float:
    """1 if the normalised prediction equals (lenient: contains) a normalised reference."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if lenient:
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
    else:
        res = {k: [tokenize(predictions[k])] for k in keys}
        gts = {k: [tokenize(r) for r in references[k]] for k in keys}
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

Scorer = Callable[[str, Sequence[str], bool], float]


def score_task(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]],
               ptb: str = "python") -> dict:
    """The task's metric, raw and lenient, each with its 95% interval and per-sample values."""
    n = len(predictions)
    if task == "coco":
        raw, per = cider_d(predictions, references, ptb)
        core = [caption_core(p) for p in predictions]
        norm, per_norm = cider_d(core, references, ptb)
        ci, ci_norm = bootstrap_ci(per), bootstrap_ci(per_norm)
        return {
            "metric": "CIDEr-D", "units": "CIDEr x 100", "samples": n,
            "score": raw, "ci95": list(ci),
            "ci_method": f"percentile bootstrap over samples ({BOOTSTRAP} resamples, IDF "
                         f"of the whole set kept fixed)",
            "tokenizer": "PTBTokenizer (Java)" if ptb == "java" else "Python PTB tokenization",
            "normalised_score": norm, "normalised_ci95": list(ci_norm),
            "normalisation": CAPTION_NORMALISATION,
            "per_sample": per.tolist(), "per_sample_normalised": per_norm.tolist(),
        }
    if task == "vqav2":
        name, scorer, binary = "VQA accuracy", vqa_accuracy, False
    elif task == "ocrvqa":
        name, scorer, binary = "exact-match accuracy", exact_match, True
    else:
        raise ValueError(f"unknown task {task!r}")
    per = np.array([scorer(p, r, False) for p, r in zip(predictions, references)])
    per_norm = np.array([scorer(p, r, True) for p, r in zip(predictions, references)])
    if binary:
        ci = wilson_ci(per.sum(), n)
        ci_norm = wilson_ci(per_norm.sum(), n)
        method = "Wilson score interval (binomial)"
    else:
        ci, ci_norm = bootstrap_ci(per), bootstrap_ci(per_norm)
        method = f"percentile bootstrap over samples ({BOOTSTRAP} resamples)"
    mean = lambda a: 100.0 * float(a.mean()) if len(a) else float("nan")  # noqa: E731
    return {
        "metric": name, "units": "%", "samples": n,
        "score": mean(per), "ci95": [100.0 * c for c in ci], "ci_method": method,
        "answer_normalisation": "VQA evaluation: punctuation, number words to digits, "
                                "articles removed, contractions; prediction always normalised",
        "normalised_score": mean(per_norm), "normalised_ci95": [100.0 * c for c in ci_norm],
        "normalisation": "a reference counts as given when it occurs word for word inside "
                         "the normalised answer (conversational answers are sentences)",
        "per_sample": (100.0 * per).tolist(), "per_sample_normalised": (100.0 * per_norm).tolist(),
    }


def running_score(task: str, predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> float:
    """The raw score so far, for the progress bar (CIDEr-D's IDF from the samples done)."""
    if not predictions:
        return float("nan")
    if task == "coco":
        return cider_d(predictions, references)[0] if len(predictions) > 1 else float("nan")
    scorer = vqa_accuracy if task == "vqav2" else exact_match
    return 100.0 * float(np.mean([scorer(p, r) for p, r in zip(predictions, references)]))
