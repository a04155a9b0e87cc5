"""Caption tokenization for CIDEr-D, in Python.

COCO's caption evaluation (pycocoevalcap) tokenizes every caption with Stanford CoreNLP
3.4.1's PTBTokenizer (`-preserveLines -lowerCase`, a Java program) and then drops the
punctuation tokens. Users of this package may have no Java, so `tokenize` reproduces that
pipeline: a lexer with the same rules (at each point the longest match wins, the earlier
rule on a tie, as in the JFlex scanner CoreNLP is generated from) and the same
normalisations: quotes to `` '' ` ', dashes to --, ellipses to ..., brackets to -lrb- etc.,
currency signs (£ -> #, € -> $, ¢ -> cents), vulgar fractions (½ -> 1/2), HTML entities
(&amp; -> &), clitics split ("is n't", "ca n't", "gon na", "lem me"), abbreviations kept
with their period ("lt.", "bldg.", "no." before a number), URLs, e-mail addresses and
emoticons whole. Its character classes (which characters make words, which stand alone,
which are dropped) are CoreNLP's own, measured (ptb_chars.py).

tests/data/eval/ptb_fixture_reference.json holds CoreNLP's output on the captions of
tests/caption_fixture.py; the tests check that `tokenize` gives exactly that.
`java_tokenize` runs the Java original when Java is installed (moshivis-eval --ptb java);
both give the same scores.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from . import ptb_chars

PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!",
               ",", ":", "-", "--", "...", ";"}
"""pycocoevalcap's list, as it applies to lower-cased tokens: its upper-case bracket names
(-LRB- ...) never match the lower-cased output, so brackets stay as tokens."""
DROPPED = PUNCTUATION - {"-lrb-", "-rrb-", "-lcb-", "-rcb-"}

LINE_BREAKS = "\r\n\u2028\u2029\x0b\x0c\x85"
SKIPPED = set("\n \t\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
              "\u3000\u200b\u200e\u200f\ufeff\x00")
"""Spaces, and the invisible characters CoreNLP skips as it skips spaces."""
"""Characters CoreNLP ends a line at: each caption must stay one line, so they are spaces."""


def _points(ranges: str) -> list[int]:
    out = []
    for r in ranges.split():
        a, _, b = r.partition("-")
        out.extend(range(int(a, 16), int(b or a, 16) + 1))
    return out


def _class(points: list[int]) -> str:
    """A regular expression character class's inside, from code points."""
    out, points = [], sorted(points)
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        a, b = re.escape(chr(points[i])), re.escape(chr(points[j]))
        out.append(a if i == j else f"{a}-{b}")
        i = j + 1
    return "".join(out)


_WORDISH = _points(ptb_chars.LETTERS)
LET = _class(_WORDISH)  # letters and digits
DIG = _class([c for c in _WORDISH if unicodedata.category(chr(c)) == "Nd"])
SYMBOLS = _class(_points(ptb_chars.SYMBOLS))
ALNUM = f"[{LET}]"
LETTER = (f"(?:(?![{DIG}])[{LET}\u00ad]|&[aeiou](?:acute|grave|uml);)")
DIGIT = f"[{DIG}]"
SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
SPACENL = "[ \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\x0b\x0c\x85]"
APOS = "(?:['\u0092\u2019]|&apos;)"
APOSETC = "(?:['\u0092\u2019`\u0091\u2018\u201b]|&apos;)"
HYPHEN = "[-_\u058a\u2010\u2011]"
NUM = rf"(?:{DIGIT}*(?:[.:,]{DIGIT}+)+|{DIGIT}+(?:[.:,\u00ad]{DIGIT}+)*)"
NUMBER = rf"[-+]?{NUM}"
WORD = rf"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"
REDAUX = rf"{APOS}(?:[msd]|re|ve|ll)"
SWORD = r"[a-z\u00ad]*[a-mo-z]\u00ad*"
SREDAUX = rf"n{APOSETC}t"
UPPER = "(?-i:[A-Z])"
SGML = (r"<(?:[!?][a-z-][^>\r\n]*|[a-z][a-z0-9_:.-]*(?: +(?:[a-z][a-z0-9_:.-]*"
        r"(?: *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|[a-z][a-z0-9_:.-]*))?))* */?"
        r"|/[a-z][a-z0-9_:.-]*) *>")
ACRO = r"(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r)|[a-z](?:\.[a-z])*"
ABBREV1 = (r"(?:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs"
           r"|fri|ala|ariz|az|ark|calif|colo|conn|ct|dak|del|fla|ga|ill|ind|kans?|ky|la"
           r"|mass|md|mich|minn|miss|mo|mont|neb|nev|okla|ore|pa|penn|tenn|tex|va|vt|wash"
           r"|wisc?|wyo|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl"
           r"|sys|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg)\.")
ABTITLE = (r"mr|mrs|ms|miss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev"
           r"|maj|sgt|cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det"
           r"|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc")
ABBREV2 = rf"(?:{ABTITLE}|vs|alex|wm|jos|cie|a\.k\.a|cf|treas|invt|elec|natl|m[ft]g)\."
ABBREV3 = r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\."

# A rule: (pattern, trailing context or None, action). The action gets the matched text and
# returns (tokens, characters to give back to the input).
Action = Callable[[str], tuple[list[str], int]]


def _keep(t: str) -> tuple[list[str], int]:
    return [t], 0


def _drop(t: str) -> tuple[list[str], int]:
    return [], 0


def _as(out: str) -> Action:
    return lambda t: ([out], 0)


def _give_back(n: int) -> Action:
    return lambda t: ([t[:-n]], n)


def _unsoft(t: str) -> tuple[list[str], int]:
    return [t.replace("\u00ad", "")], 0


def _apos(t: str) -> tuple[list[str], int]:
    """Apostrophes in a word made straight (handleQuotes, for the words that keep them)."""
    return [re.sub("[\u0092\u2019]|&apos;", "'", t)], 0


def _quote(t: str) -> tuple[list[str], int]:
    """Any quote: the tokenizer makes it ` ' `` or '', all of which are dropped; `"` alone
    or as two apostrophes too. Only its being a token of its own matters here."""
    return ["'"], 0


def _ellipsis(t: str) -> tuple[list[str], int]:
    return ["..."], 0


def _parens(t: str) -> tuple[list[str], int]:
    return [t.replace("(", "-LRB-").replace(")", "-RRB-")], 0


def _spaced(t: str) -> tuple[list[str], int]:
    return [re.sub("[ \r\n]", "\u00a0", t)], 0


def _amp(t: str) -> tuple[list[str], int]:
    return [t.replace("&amp;", "&")], 0


THINGA = r"(?-i:[A-Z]+)(?:(?:[+&]|&amp;)(?-i:[A-Z]+))+"  # AT&T, R&D: capitals only
FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3",
             "\u2154": "2/3"}
CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$",
            "\u20ac": "$"}
SENTEND = rf"{SPACENL}(?:{SPACENL}|{UPPER}|{SGML})"

RULES: list[tuple[str, str | None, Action]] = [
    (r"c\+\+|[cf]#", None, _keep),
    (r"cannot|'twas", None, _give_back(3)),
    (rf"{APOS}tis|gonna|gotta|lemme|gimme|wanna", None, _give_back(2)),
    (SGML, None, _spaced),
    ("&(?:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, _as("--")),
    ("&amp;", None, _as("&")),
    (r"&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", None, _keep),
    (WORD, REDAUX, _unsoft),
    (SWORD, SREDAUX, _unsoft),
    (WORD, None, _unsoft),
    (rf"{APOS}n{APOS}?|[ldj]{APOS}|dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em"
     rf"|(?-i:[A-HJ-XZn]){APOSETC}{LETTER}{{2}}{LETTER}*|{APOS}[2-9]0s|{APOS}till?"
     rf"|{LETTER}+[aeiouy]{APOSETC}(?-i:[aeiouA-Z]){LETTER}*|{APOS}cause|cont'd\.?"
     r"|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|o'o", None, _keep),
    (rf"y{APOS}", LETTER, _apos),
    (r"(?:ftp|svn|svn\+ssh|http|https|mailto)://[^ \t\n\f\r\"<>|(){}]+"
     r"[^ \t\n\f\r\"'<>|.!?(){},-]", None, _keep),
    (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-z]{2,4})"
     r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu)))"
     r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", None, _keep),
    ("(?:&lt;|<)?[a-z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\\.)*"
     "(?:[^ \t\n\f\r\"<>|(){}\\[\\].,;:\u00a0]+)(?:&gt;|>)?", None, _keep),
    (rf"@[a-z_][a-z_0-9]*|#{LETTER}(?:{LETTER}|{DIGIT}|_)*", None, _keep),
    (REDAUX, "[^a-z]", _apos),
    (SREDAUX, "[^a-z]", _apos),
    (rf"{DIGIT}{{1,2}}[-/]{DIGIT}{{1,2}}[-/]{DIGIT}{{2,4}}", None, _keep),
    (NUMBER, None, _keep),
    (rf"(?:{DIGIT}{{1,4}}[- \u00a0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}}", None,
     lambda t: ([t.replace(" ", "\u00a0")], 0)),
    ("[\u00bc\u00bd\u00be\u2153\u2154]", None, lambda t: ([FRACTIONS[t]], 0)),
    (r"-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"
     rf"|cap{APOS}n|c{APOS}est", None, lambda t: ([t.replace("&amp;", "&")], 0)),
    (rf"(?:{ALNUM}+(?:-[{LET}]+){{0,2}})(?:\\?/{ALNUM}+(?:-{ALNUM}+){{0,2}}){{1,2}}", None,
     _keep),
    (r"(?-i:[A-Z]*)\$|#", None, _keep),
    ("[\u00a2\u00a3\u00a4\u0080\u20a0\u20ac]", None, lambda t: ([CURRENCY[t]], 0)),
    (rf"(?:{ACRO})\.", rf"{SPACENL}+(?-i:[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]"
     r"|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any"
     r"|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome"
     r"|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen"
     rf"|[W]hile|[W]hat|[W]ho|[W]hy|[Y]et|[Y]ou)(?:{SPACENL}|[?!])",
     lambda t: ([t[:-1]], 1) if len(t) == 2 else ([t], 1)),
    (ABBREV3, f"{SPACENL}?{DIGIT}", _keep),
    (r"(?:pt[ey]|co)\.", rf"{SPACE}(?:ltd|lim)", _keep),
    (ABBREV1, SENTEND, lambda t: ([t], 1)),
    (ABBREV1, "(?s:..)", _keep),
    (ABBREV1, None, lambda t: ([t], 1)),
    (ABBREV2, None, _keep),
    (rf"(?:{ACRO})\.", SPACENL, _keep),
    (rf"(?:{ACRO})\.", None, _keep),
    (rf"(?:{ABTITLE}|vs|alex|wm|jos|cie|a\.k\.a|cf|treas|{ACRO}|invt|elec|natl|m[ft]g)",
     SPACE, _keep),
    (ACRO, SPACENL, _keep),
    (rf"{APOS}[0-9][0-9]", SPACENL, _keep),
    (rf"{WORD}\.", "[,;:\u3001]", _unsoft),
    (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
     r"[0-9]{3,4}[- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}"
     r"\.[0-9]{3,5}", None, lambda t: ([t.replace(" ", "\u00a0").replace("(", "-LRB-")
                                        .replace(")", "-RRB-")], 0)),
    ("\"|&quot;|[`'\u0091\u0092\u2018\u2019]'", None, _quote),
    ("\x7f", None, _drop),
    ("<|&lt;", None, _as("<")),
    (">|&gt;", None, _as(">")),
    (r"[<>]?[:;=](?-i:[-o*'])?(?-i:[()DPdpO\\{@|\[\]])", "[^a-z0-9]|$", _parens),
    (r"[-^x=~<>]\.[-^x=~<>]|[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)"
     r"|\([-^x=~<>']-[-^x=~<>'`]\)", None, _parens),
    (r"\{", None, _as("-LCB-")),
    (r"\}", None, _as("-RCB-")),
    (r"\[", None, _as("-LSB-")),
    (r"\]", None, _as("-RSB-")),
    (r"\(", None, _as("-LRB-")),
    (r"\)", None, _as("-RRB-")),
    (r"-+", None, lambda t: (["--" if 3 <= len(t) <= 4 else t], 0)),
    ("\\.\\.\\.+|[\u0085\u2026]", rf"\.{SPACENL}+{LETTER}", _ellipsis),
    ("\\.[ \u00a0](?:\\.[ \u00a0])+\\.", rf"{SPACE}\.{SPACENL}+{LETTER}", _ellipsis),
    ("\\.\\.\\.+|[\u0085\u2026]|\\.[ \u00a0](?:\\.[ \u00a0])+\\.", None, _ellipsis),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    ("[,;:\u3001]", None, _keep),
    ("[?!]+", None, _keep),
    ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, _keep),
    ("/", None, _keep),
    (rf"{ALNUM}[{LET}.,\u00ad]*(?:-(?:[a-z](?:\.[a-z])+\.|[{LET}\u00ad]+))+", None, _unsoft),
    (rf"(?:[ldo]{APOSETC}{ALNUM})?(?:{ALNUM}+|{NUMBER})(?:{HYPHEN}(?:[ldo]{APOSETC}{ALNUM})?"
     rf"(?:{ALNUM}+|{NUM}))*", None, _apos),
    (THINGA, "[,;:\u3001]", _amp),
    (THINGA, None, _amp),
    (rf"(?:{APOS}|[`\u2018\u2019\u201b\u201c\u201d\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}})",
     None, _quote),
    (rf"(?:{APOS}|[`\u2018\u2019\u201b\u201c\u201d\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}})",
     f"{LETTER}[^ \t\u00a0\u2000-\u200a\u3000\r\n\u2028\u2029\x0b\x0c\x85]", _quote),
    (rf"(?:{APOS}|[`\u2018\u2019\u201b\u201c\u201d\u0091-\u0094\u2039\u203a\u00ab\u00bb]{{1,2}})",
     f"[aiu]{SPACENL}", _quote),
    (REDAUX, None, _apos),
    (SREDAUX, None, _apos),
    (r"<<|>>", None, _keep),
    ("[\u0086\u0087\u0089\u0095\u0098\u0099]", None, _keep),
    (f"[{SYMBOLS}]", None, _keep),
    ("&nbsp;", None, _drop),
    ("(?s:.)", None, _drop),
]
_COMPILED = [(re.compile(p, re.IGNORECASE), re.compile(c, re.IGNORECASE) if c else None, a)
             for p, c, a in RULES]


def _lex(text: str) -> list[tuple[str, int]]:
    """The tokens of `text` (lines joined by "\\n", as CoreNLP reads its file), lower-cased,
    punctuation included, each with where it starts."""
    tokens: list[tuple[str, int]] = []
    pos, n = 0, len(text)
    while pos < n:
        if text[pos] in SKIPPED:
            pos += 1
            continue
        best = None
        for rx, ctx, action in _COMPILED:
            m = rx.match(text, pos)
            if m is None or m.end() == pos:
                continue
            end = span = m.end()
            if ctx is not None:
                c = ctx.match(text, end)
                if c is None:
                    continue
                span = c.end()
            if best is None or span > best[0]:
                best = (span, end, action)
        _, end, action = best
        out, back = action(text[pos:end])
        tokens.extend((t.lower(), pos) for t in out)
        pos = end - back
    return tokens


def _line(text: str) -> str:
    """One caption as one line: line breaks made spaces (CoreNLP would end the line there),
    characters outside the Basic Multilingual Plane, none of which CoreNLP 3.4.1 makes a
    token (emoji included), made spaces too."""
    return "".join(" " if c in LINE_BREAKS or ord(c) > 0xFFFF else c for c in text)


def treebank_lines(lines: list[str]) -> list[list[str]]:
    """PTBTokenizer's tokens (lower-cased, punctuation included) of captions given to it
    together, one per line, as pycocoevalcap does. CoreNLP reads them as one text, so a
    caption's tokens can depend on the next one: a caption ending in a one-letter
    abbreviation ("... the letter B.") before one starting with a word such as "The" or
    "A" loses the period, and the last caption has no line end after it (it decides
    "they'll" at the very end: "they ` ll")."""
    texts = [_line(t) for t in lines]
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t) + 1
    out: list[list[str]] = [[] for _ in texts]
    k = 0
    for tok, start in _lex("\n".join(texts)):
        while k + 1 < len(starts) and start >= starts[k + 1]:
            k += 1
        out[k].append(tok)
    return out


def treebank(text: str) -> list[str]:
    """PTBTokenizer's tokens of one caption given alone (lower-cased), punctuation
    included."""
    return treebank_lines([text])[0]


def tokenize_lines(lines: list[str]) -> list[str]:
    """Captions as pycocoevalcap scores them when it tokenizes them together (in this
    order): Treebank tokens, punctuation dropped, joined by single spaces."""
    return [" ".join(t for t in toks if t not in DROPPED) for toks in treebank_lines(lines)]


def tokenize(text: str) -> str:
    """A caption as pycocoevalcap scores it when tokenized alone."""
    return tokenize_lines([text])[0]


def java_tokenize(captions: dict[object, list[str]]) -> dict[object, list[str]]:
    """pycocoevalcap's own PTBTokenizer (needs Java): {key: [caption, ...]} -> the same
    keys with the tokenized captions. Characters CoreNLP would end a line at are made
    spaces first, as `tokenize` does (pycocoevalcap replaces only "\\n", and a caption
    broken in two would shift every caption after it)."""
    import shutil

    from ..errors import MoshivisError

    if shutil.which("java") is None:
        raise MoshivisError("--ptb java needs Java on the PATH",
                            "install a Java runtime, or use the Python tokenizer (--ptb python)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    table = str.maketrans({ch: " " for ch in LINE_BREAKS})
    wrapped = {k: [{"caption": c.translate(table)} for c in v] for k, v in captions.items() if v}
    out = PTBTokenizer().tokenize(wrapped)
    return {k: out.get(k, []) for k in captions}
