"""A deterministic set of captions for checking the caption tokenization against CoreNLP's
PTBTokenizer: references in COCO's style, spoken-style answers, mixed scripts (accents,
CJK, Cyrillic, Greek, emoji), characters of every Unicode punctuation class, spaces and
format characters, and the hard ASCII cases of the Penn Treebank conventions
(abbreviations, contractions, hyphenation, currency, slashes, emoticons, URLs, entities).

`captions()` gives the same list on every run and every machine (a seeded generator, no
dependence on hashing or dictionaries' order)."""

from __future__ import annotations

import random

SUBJECTS = ["A man", "A woman", "Two dogs", "A little girl", "The cat", "A group of people",
            "An old bus", "A young boy", "Three zebras", "A red truck", "A plate", "Some sheep",
            "A skateboarder", "The chef", "Several birds", "A baby elephant", "A tennis player",
            "The train", "A bowl of soup", "A pizza"]
VERBS = ["is riding", "sitting on", "standing next to", "looking at", "holding", "eating",
         "walking down", "parked in front of", "lying on", "flying over", "playing with",
         "covered with", "waiting for", "jumping over", "carrying"]
OBJECTS = ["a wave", "the street", "a wooden bench", "a kitchen counter", "the beach",
           "a large clock tower", "a plate of food", "the snow", "a frisbee", "an umbrella",
           "a laptop's keyboard", "the dogs' bowls", "a double-decker bus", "a fire hydrant",
           "a cell phone", "the city's skyline", "a well-lit room", "a cup of coffee"]
ENDINGS = [".", "", " .", "!", "?", "...", " …", ".\u00a0", ";", ":", ". ", "..", "!!", "?!"]
LEAD_INS = ["The image shows", "I see", "Well, I think it's", "It looks like", "Hmm, that's",
            "So, there's", "This is a picture of", "Uh, I'd say it's", "Okay, so it's",
            "Yeah, I can see", "In this image there is", "Oh, it's"]
SPOKEN_TAILS = ["and, you know, it's pretty nice.", "— I'm not sure, though.",
                "I guess they're having fun!", "isn't it?", "which I'd call a classic.",
                "I can't tell what's behind it.", "if I'm not mistaken.", "they've got it.",
                "that's all I can see...", "we'll see.", "you'd love it."]
HARD_ASCII = [
    "He came w/ a friend", "Apples at $3.99/lb today", "Lt. Dan and Bldg. 5", "no. of people",
    "the no. 9 bus", "Show 'em the way", "'cause it's late", "ol' man river",
    "lemme see that", "gimme a break", "gonna rain", "wanna go", "gotta run", "cannot stop",
    "a can't-miss show", "a+b=c on the board", "smiling :) at me", "sad :( face", ";) wink",
    "see http://www.example.com/a?b=1&c=2 now", "go to www.example.org today",
    "mail me at john.doe@example.com please", "Tom &amp; Jerry", "1 &lt; 2 &gt; 0",
    "a &quot;quoted&quot; word", "R&D lab", "AT&T store", "U.S. flag", "the U.S.A. team",
    "e.g. a cat", "i.e. a dog", "Mr. Smith and Mrs. Jones", "Dr. Who", "St. Louis",
    "Jan. 5th", "etc. and so on", "Inc. and Co.", "vs. them", "Prof. X", "Gen. Lee",
    "Mt. Fuji", "Ft. Worth", "Ave. Q", "approx. 5 miles", "fig. 3", "ca. 1900", "p.m. today",
    "at 10:30 a.m.", "it costs $5", "it costs $ 5", "US$ 20", "C$10", "#1 fan", "100% sure",
    "3.5 inches", "1,000 people", "-5 degrees", "+3 points", "1/2 cup", "3/4 full",
    "2 1/2 hours", "12/25/2014", "2014-12-25", "555-1234", "(555) 123-4567",
    "the '90s look", "rock 'n' roll", "'tis the season", "'twas night", "y'all come",
    "O'Neill's pub", "d'Artagnan", "l'amour", "rock'n'roll", "don't", "DON'T", "won't",
    "shan't", "ain't", "I'd've", "could've", "they'll", "she'd", "I'm", "you're", "it's",
    "dogs' toys", "James' car", "cats'", "'quoted'", "''double''", "``latex''",
    "a -- b", "a --- b", "a ---- b", "a - b", "a-b", "co-op", "e-mail", "x-ray",
    "re-enter", "mother-in-law", "20-year-old", "well-known", "T-shirt", "self-driving",
    "a_b", "snake_case_name", "__init__", "a*b", "***", "a**b", "=>", "==", "a=b",
    "a|b", "a\\b", "a^b", "a~b", "~5", "a<b", "a>b", "<b>bold</b>", "<br/>", "<p class='x'>",
    "x&y", "a & b", "&", "@user", "#hashtag", "a@b", "@@", "##", "a#b", "a%b",
    "C++ code", "C# code", "f# code", "E! news", "Yahoo! mail", "OK! magazine",
    "file.txt", "photo.jpg", "script.py", "a.b.c", "3.14.15", "1.2.3.4", "v1.2",
    "No. 5", "NO. 5", "No. of", "Nos. 3", "Figs. 2", "pp. 12", "Sec. 4",
    "So. Africa", "No. Korea", "Pty. Ltd.", "Co. Ltd.", "Calif. coast", "Mass. Ave.",
    "Wash. state", "Tex. ranch", "Oct. 31", "Sept. 1", "Tues. night", "a.k.a. Bob",
    "cf. above", "Ph.D. student", "Jr. high", "Sr. member", "Capt. Hook", "Sgt. Pepper",
    "I. M. Pei", "J.R.R. Tolkien", "A. Smith", "U.K. based", "U.S. Army",
    "the U.S. He", "in the U.S. The end", "E.U. rules", "N.Y.C.", "a.m.", "p.m.",
    "I.", "Z.", "X. Y. Z.", "ok.", "OK.", "ok..", "wow!!!", "what?!", "what??",
    "!!!", "?!?", "a.", "b!", "c?", "...", "....", ". . .", "a . . . b", "end....",
    "end.... Next", "wait...what", "wait.. what", "hello,world", "1,2,3", "a;b", "a:b",
    "a:)", ":-)", ":-(", ":D", ":P", ":p", ";-)", "=)", "<3", ":'(", ":o", "8)", "xD",
    "^_^", "-_-", "o_O", "(x)", "[x]", "{x}", "((x))", "a(b)c", "f(x)=y",
    "$", "$$", "$5.00", "5$", "USD5", "10 $", "¢", "50c", "$1.5m", "$1,000,000",
    "'", "''", "'''", "\"", "\"\"", "\"a\"", "' a '", "'a'", "'s", "'re", "n't",
    "'em all", "'round the corner", "'til dawn", "'till dawn", "s'mores", "c'mon",
    "li'l", "ev'ry", "e'er", "nor'easter", "o'clock", "ma'am", "ne'er", "Dunkin' Donuts",
    "somethin' else", "goin' home", "rock 'n roll", "cont'd", "nat'l", "diff'rent",
    "Hawai'i", "Shi'ite", "B'nai", "I'll", "y'know", "Y'all", "don'ts",
    "1990s", "'80s", "80's", "mid-'90s", "4x4", "2x", "x2", "3D", "4K", "A4 paper",
    "B-52", "F-16", "COVID-19", "24/7", "9/11", "and/or", "he/she", "w/o", "a/b/c",
    "km/h", "50mph", "5km", "10kg", "6ft", "5'11\"", "6' tall", "3\" long",
    "-LRB-", "-RRB-", "-lrb-", "pro-choice", "anti-war", "S&P-500", "S&Ls", "Cap'n",
    "f*ck", "sh*t", "d*mn", "damn", "TV's", "CD's", "ABC's", "the 1st", "2nd", "3rd",
    "tab\there", "two  spaces", "trailing space ", " leading", "a\tb\tc",
    "hello.World", "hello.world", "Hello.", "U.S.-made", "non-U.S.", "U.S.-U.K.",
    "ya'll", "gov't", "int'l", "ass'n", "'N Sync", "n'", "'n'", "rock-'n'-roll",
    "T&C", "A&W", "Q&A", "B&B", "AT&amp;T", "P&G's", "a&amp;b",
    "&nbsp;", "&mdash;", "&ndash;", "&MD;", "&#39;", "&#8212;", "&apos;", "&eacute;",
    "&lt;tag&gt;", "&foo;", "& amp;", "1&2", "mm-hm", "uh-huh", "uh-oh", "o-kay",
    "ex-wife", "non-stop", "pre-war", "post-war", "semi-final", "co-worker", "re-do",
    "hands-free", "self-less", "child-like", "clock-wise", "Water-gate", "mr.", "MR.",
    "3:00pm", "3pm", "12:30:45", "noon.", "1.5", ".5", "5.", "5..", "0.5%", "-0.5",
    "+-5", "±5", "5°C", "90°", "5 °F", "x²", "H₂O", "E=mc²", "10⁶", "½ cup", "¼ mile",
    "1½ cups", "⅓ of", "¾", "1⁄2", "30×40", "6÷3", "a·b", "a•b", "§ 5", "¶ 2",
    "© 2014", "® brand", "™ mark", "Coke™", "No™", "a™b", "°", "…", "‥", "‰",
]
UNICODE_PUNCT = [
    # Pc, Pd
    "_", "‿", "⁀", "⁔", "︳", "＿", "-", "‐", "‑", "‒", "–", "—", "―", "⸗", "⸚", "〜", "゠",
    "﹘", "﹣", "－", "֊", "־", "᐀", "᠆",
    # Ps, Pe
    "(", ")", "[", "]", "{", "}", "⁅", "⁆", "〈", "〉", "《", "》", "「", "」", "『", "』",
    "【", "】", "〔", "〕", "〖", "〗", "〘", "〙", "〚", "〛", "⟨", "⟩", "⦃", "⦄", "﹙", "﹚",
    "（", "）", "［", "］", "｛", "｝", "｢", "｣", "༺", "༻", "❨", "❩", "⌈", "⌉", "‚", "„",
    # Pi, Pf
    "«", "»", "‘", "’", "“", "”", "‹", "›", "‛", "‟", "⸂", "⸃", "⸠", "⸡",
    # Po
    "!", "\"", "#", "%", "&", "'", "*", ",", ".", "/", ":", ";", "?", "@", "\\", "¡", "§",
    "¶", "·", "¿", "‖", "†", "‡", "•", "‣", "‥", "…", "‧", "‰", "′", "″", "‴", "※", "‼",
    "‽", "⁂", "⁇", "⁈", "⁉", "、", "。", "〃", "・", "！", "？", "，", "．", "：", "；",
    "＃", "＆", "＊", "＠", "｡", "､", "՝", "։", "؟", "٪", "।", "॥", "⸮", "꙳",
    # symbols: Sc, Sm, Sk, So
    "$", "£", "€", "¢", "¥", "₹", "₩", "₽", "₺", "฿", "₫", "₪", "₠", "¤", "+", "<", "=",
    ">", "|", "~", "¬", "±", "×", "÷", "∑", "∞", "≈", "≠", "≤", "→", "⇒", "^", "`", "¨",
    "¯", "´", "˜", "˚", "©", "®", "°", "™", "★", "☆", "♥", "♪", "✓", "✔", "☺", "☹",
]
SPACES = ["\u00a0", "\u2002", "\u2003", "\u2009", "\u200a", "\u202f", "\u3000", "\t",
          "\u200b", "\u200e", "\ufeff", "\u00ad", "\u2060", "\u200d", "\u205f", "\u1680"]
SCRIPTS = ["café", "naïve", "résumé", "Zürich", "São Paulo", "crème brûlée", "piñata",
           "Ærø", "smørrebrød", "Łódź", "İstanbul", "straße", "STRASSE", "Ελληνικά", "ΟΔΟΣ",
           "кошка", "Москва", "собака на диване", "猫が座っている", "一只猫", "中文字幕",
           "한국어", "ひらがな", "カタカナ", "ﾊﾝｶｸ", "עברית", "العربية", "हिन्दी", "ไทย",
           "Ｆｕｌｌｗｉｄｔｈ", "ｆｕｌｌ", "😀", "🐶", "👍🏽", "🇫🇷", "❤️", "👨‍👩‍👧",
           "🍕 pizza", "a🙂b", "Ǆ", "ǅ", "ﬁ ligature", "Ⅻ", "①", "٣", "१२", "௧",
           "e\u0301", "n\u0303o", "a\u0308b", "ℌ", "℃", "Å", "µm", "ß", "ŉ", "ǰ"]
SPOKEN_ANSWERS = ["Yes.", "No.", "Yeah!", "Nope...", "Two.", "It's red.", "A T-shirt.",
                  "Uh… maybe three?", "I'd say “blue”.", "It’s a dog’s bowl.",
                  "They’re on the left—next to the bench.", "Hmm – hard to tell.",
                  "‘The Art of War’.", "«Le Petit Prince»", "About £5, I think.",
                  "It costs €10.", "Only 50¢!", "Maybe ¥500?", "Around ₹200.",
                  "The sign says “STOP”.", "It says ‘EXIT’ … I think.", "Well — no.",
                  "Ok.", "OK!", "okay", "Sure thing :)", "I don't know.", "I dunno.",
                  "Lemme think… a cat.", "It’s ’bout noon.", "Rock ’n’ roll!"]


def _coco(rng: random.Random) -> str:
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            f"{rng.choice(ENDINGS)}")


def _spoken(rng: random.Random) -> str:
    return (f"{rng.choice(LEAD_INS)} {rng.choice(OBJECTS)}, "
            f"{rng.choice(SPOKEN_TAILS)}")


def _with(rng: random.Random, piece: str) -> str:
    """A caption carrying `piece`: alone, inside a sentence, or glued to a word."""
    way = rng.randrange(6)
    base = _coco(rng).rstrip(".!?;: …\u00a0")
    if way == 0:
        return piece
    if way == 1:
        return f"{base} {piece}."
    if way == 2:
        return f"{piece} {base.lower()}"
    if way == 3:
        return f"{base}{piece}{rng.choice(['', ' ', '.'])}"
    if way == 4:
        return f"word{piece}word {base}"
    return f"{rng.choice(LEAD_INS)} {piece} {rng.choice(OBJECTS)}."


def captions(n_random: int = 400) -> list[str]:
    """The fixture: every listed piece in a sentence (and the hard ASCII cases alone too),
    then `n_random` seeded combinations."""
    rng = random.Random(20250121)
    out: list[str] = []
    out += HARD_ASCII
    out += [_with(rng, p) for p in HARD_ASCII]
    out += [_with(rng, p) for p in UNICODE_PUNCT]
    out += [f"a{p}b {p}c d{p} {p}" for p in UNICODE_PUNCT]
    out += [_with(rng, s).replace(" ", s, rng.randrange(1, 3)) for s in SPACES]
    out += [_with(rng, s) for s in SCRIPTS]
    out += SPOKEN_ANSWERS
    for _ in range(n_random):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(_coco(rng))
        elif kind == 1:
            out.append(_spoken(rng))
        else:
            pieces = rng.sample(HARD_ASCII + UNICODE_PUNCT + SCRIPTS + SPOKEN_ANSWERS, 3)
            out.append(" ".join([_coco(rng).rstrip(".")] + pieces))
    return out
