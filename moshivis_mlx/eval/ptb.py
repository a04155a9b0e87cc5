"""Caption tokenization for CIDEr-D, in Python.

COCO's caption evaluation (pycocoevalcap) tokenizes every caption with Stanford CoreNLP's
PTBTokenizer (`-lowerCase -preserveLines`, a Java program) and then drops the punctuation
tokens. Users of this package may have no Java, so `tokenize` reproduces that pipeline
for the text captions and spoken answers are made of: lower case; clitics split as the
Penn Treebank does ("man's" -> "man 's", "isn't" -> "is n't", "cannot" -> "can not");
brackets become -lrb- / -rrb- / -lsb- / -rsb- / -lcb- / -rcb- tokens (which, lower-cased,
pycocoevalcap does not drop); sentence punctuation, quotes, dashes and ellipses dropped;
"$", "#", "%" and other symbols split off; numbers ("3.5", "1,000", "10:30"), hyphenated
words, acronyms ("u.s.") and common abbreviations ("mr.", "st.", "etc.") kept whole.

tests/data/eval/ptb_reference.json holds captions with CoreNLP's own output; the tests
check that `tokenize` gives exactly that. The Java tokenizer knows more rare cases (SGML
tags, emoticons, URLs with punctuation, every English abbreviation); `java_tokenize` runs
it when Java is installed (moshivis-eval --ptb java).
"""

from __future__ import annotations

import re

PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!",
               ",", ":", "-", "--", "...", ";"}
"""pycocoevalcap's list, as it applies to lower-cased tokens: its upper-case bracket names
(-LRB- ...) never match the lower-cased output, so brackets stay as tokens."""
DROPPED = PUNCTUATION - {"-lrb-", "-rrb-", "-lcb-", "-rcb-"}

BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
BRACKET_NAMES = set(BRACKETS.values())
ABBREVIATIONS = {
    "mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "fig.", "no.", "prof.",
    "inc.", "ltd.", "co.", "corp.", "mt.", "ave.", "approx.", "dept.", "est.", "gen.", "gov.",
    "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.", "oct.", "nov.",
    "dec.", "mon.", "tue.", "wed.", "thu.", "fri.", "sat.", "sun.", "ft.", "lb.", "oz.",
}
ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$")  # u.s. e.g. i.e. p.m.
CLITIC = re.compile(r"^(.+?)('s|'m|'d|'re|'ve|'ll|n't)$")
NOT_A_QUOTE = re.compile(r"^'(\d|n'|t(is|was)$|(s|m|d|re|ve|ll)$)")  # '90s 'n' 'tis 's
SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"),
               "gotta": ("got", "ta"), "'tis": ("'t", "is"), "'twas": ("'t", "was")}


def _spaced(text: str) -> str:
    """Puts spaces around what is always a token of its own."""
    for ch, name in BRACKETS.items():
        text = text.replace(ch, f" {name} ")
    text = text.replace('"', " `` ").replace("`", " ` ")
    text = re.sub(r"\.\.\.+", " ... ", text)
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"([!?]+)", r" \1 ", text)
    text = re.sub(r"([*~=|^\\$#%;])", r" \1 ", text)
    text = re.sub(r",(?!\d)|(?<!\d),", " , ", text)  # 1,000 stays whole
    text = re.sub(r":(?!\d)|(?<!\d):", " : ", text)  # 10:30 stays whole
    text = re.sub(r"(\w)('s)-(\w)", r"\1 \2 - \3", text)  # dog's-eye
    return text


def _word(token: str) -> list[str]:
    """One whitespace-separated token -> its Treebank tokens."""
    if token in BRACKET_NAMES:
        return [token]
    out_tail: list[str] = []
    head: list[str] = []
    if token.startswith("'") and len(token) > 1 and not NOT_A_QUOTE.match(token):
        head, token = ["'"], token[1:]
    while token:
        if token.endswith("'") and not token.endswith("n'") and len(token) > 1:
            out_tail.insert(0, "'")  # closing quote, or a plural possessive (dogs')
            token = token[:-1]
        elif token.endswith("-") and len(token) > 1:
            out_tail.insert(0, "-")
            token = token[:-1]
        elif token.endswith(".") and len(token) > 1 and not (
                token in ABBREVIATIONS or ACRONYM.match(token)):
            out_tail.insert(0, ".")
            token = token[:-1]
        else:
            break
    words: list[str] = []
    if token in SPLIT_WORDS:
        words = list(SPLIT_WORDS[token])
    else:
        while token:
            m = CLITIC.match(token)
            if m is None or m.group(1) in ("'",):
                words.insert(0, token)
                break
            words.insert(0, m.group(2))
            token = m.group(1)
    return head + words + out_tail


def treebank(text: str) -> list[str]:
    """PTBTokenizer's tokens of one line (lower-cased), punctuation included."""
    text = _spaced(text.replace("\n", " ").lower())
    tokens: list[str] = []
    for t in text.split():
        tokens.extend(_word(t))
    return tokens


def tokenize(text: str) -> str:
    """A caption as pycocoevalcap scores it: Treebank tokens, punctuation dropped, joined
    by single spaces."""
    return " ".join(t for t in treebank(text) if t not in DROPPED)


def java_tokenize(captions: dict[object, list[str]]) -> dict[object, list[str]]:
    """pycocoevalcap's own PTBTokenizer (needs Java): {key: [caption, ...]} -> the same
    keys with the tokenized captions."""
    import shutil

    from ..errors import MoshivisError

    if shutil.which("java") is None:
        raise MoshivisError("--ptb java needs Java on the PATH",
                            "install a Java runtime, or use the Python tokenizer (--ptb python)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {k: [{"caption": c} for c in v] for k, v in captions.items() if v}
    out = PTBTokenizer().tokenize(wrapped)
    return {k: out.get(k, []) for k in captions}
