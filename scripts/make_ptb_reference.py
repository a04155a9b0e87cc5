"""Regenerates tests/data/eval/ptb_reference.json: captions and what pycocoevalcap's
PTBTokenizer (Stanford CoreNLP, Java) makes of them, punctuation dropped as pycocoevalcap
drops it. The tests check that moshivis_mlx.eval.ptb.tokenize gives exactly that.

    .venv/bin/python scripts/make_ptb_reference.py      # needs java and pycocoevalcap
"""

import json
from pathlib import Path

from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval" / "ptb_reference.json"

CAPTIONS = [
    # COCO-style captions and spoken answers
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a frisbee in the park.",
    "A kitchen with a stove, a sink and a refrigerator.",
    "The image shows a man riding a horse. He is wearing a hat.",
    "I see a red double-decker bus driving down the street!",
    "It's a picture of a cat sitting on a laptop's keyboard.",
    "There are 3 people standing next to a train.",
    "A plate with food.  ",
    "   a bowl of fruit",
    "A woman holding an umbrella in the rain; it's cloudy.",
    "This is a photo of a street sign that says \"STOP\".",
    "A close-up of a pizza with pepperoni, cheese, and olives...",
    "Well, I think it's a giraffe -- a tall one.",
    "A cat (black) sits [here] {there}.",
    "The title of the book is 'The Art of War'.",
    "The author is J.R.R. Tolkien.",
    "It is a cookbook, isn't it?",
    "Yes, it is. No, it isn't. Maybe?",
    # Treebank rules
    "A man's dog, running on the beach.", "The dogs' toys are on the floor.",
    "It is 10:30 and costs $5, or 50% off!", "A #1 sign; a x-ray of a well-known t-shirt.",
    "I cannot go, gonna stay. Wanna come? Gotta run.", "Rock 'n' roll at o'clock",
    "He said: 'hello' to me", "Wait... what?!", "A man -- who is tall - stands.",
    "The U.S. flag flies at St. Mark's church, Mr. Brown's house.",
    "I'm here; you're there; they've gone; she'll come; he'd go.",
    "Isn't it? Aren't they? Won't you? Can't we?", "A 3.5 inch screen and 1,000 people.",
    "Fish & chips @ home / work", "email me at a@b.com or visit www.example.com",
    "Cats:dogs ratio", "The year 1999's best", "She said \"yes.\"", "A pizza...with toppings",
    "two-thirds of the 'pie'", "a dog's-eye view", "naïve café", "L'Oreal and D'Angelo",
    "it's 5 o'clock", "the 90's", "'Tis the season", "'90s music", "a dogs , cats",
    "hello!!!", "e.g. and i.e. and etc.", "U.K.", "5 p.m. today",
    "a man, a plan, a canal: panama", "Fig. 2", "No. 5 shirt", "vs. the team", "Yes.No.",
    "a.b", "3-4 people", "1/2 cup", "+5 -3", "A man* with stars", "a ~tilde", "under_score",
    "back\\slash", "equal=sign", "pipe|here", "caret^", "He'd've gone.",
]


def main() -> None:
    tokenized = PTBTokenizer().tokenize(
        {i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    pairs = [{"caption": c, "tokenized": tokenized[i][0]} for i, c in enumerate(CAPTIONS)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"tokenizer": "Stanford CoreNLP 3.4.1 PTBTokenizer "
                               "-preserveLines -lowerCase, as pycocoevalcap 1.2 runs it",
                               "captions": pairs}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({len(pairs)} captions)")


if __name__ == "__main__":
    main()
