"""Regenerates tests/data/train/windows_reference.json: dialogues' word alignments and the
text stream of each of their windows as Kyutai's moshi-finetune builds it (its
`InterleavedTokenizer` and `Interleaver`, as its train.py sets them up). The tests check
that moshivis_mlx.train.interleave builds exactly those streams.

    MOSHI_FINETUNE=path/to/moshi-finetune .venv/bin/python scripts/make_window_reference.py

Needs torch, sentencepiece and a checkout of moshi-finetune (with moshi installed). Only
the text stream is compared, so Mimi is stood in for by something that gives the number
of frames of the audio it is handed.
"""

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import sentencepiece
import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "train"
TOKENIZER = DATA / "newline_words.model"
WORDS = ["red", "blue", "green", "what colour", "is the shape", "", " ", "red\nblue",
         "\n", "what\ncolour is", " the shape\n\nred blue green"]
WINDOWS = [1.0, 1.28, 2.5, 3.3]
SPEAKERS = ["SPEAKER_MAIN", "SPEAKER_MAIN", "SPEAKER_OTHER"]


class FrameCount:
    """Mimi's frame rate and number of frames, codes all zero."""

    frame_rate = 12.5

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 8, math.ceil(x.shape[-1] / 1920), dtype=torch.long)


def dialogue(rng: random.Random) -> tuple[float, list]:
    """A random alignment: overlapping and zero-length words, other speakers, empty
    words, words with newlines, words straddling any cut."""
    duration = round(rng.uniform(0.5, 9.0), 3)
    rows, t = [], 0.0
    while t < duration:
        start = t + rng.uniform(0, 0.4)
        end = start + rng.uniform(-0.05, 0.6)
        rows.append([rng.choice(WORDS), [round(start, 3), round(end, 3)], rng.choice(SPEAKERS)])
        t = start
    rows.sort(key=lambda r: r[1][0])
    return duration, rows


def segments(duration: float, window: float) -> list[float]:
    """sphn's segment starts (dataset_jsonl with pad_last_segment)."""
    starts, start = [], 0.0
    while start < duration:
        starts.append(float(np.float32(start)))
        start += window
    return starts


def main() -> None:
    sys.path.insert(0, os.environ["MOSHI_FINETUNE"])
    from finetune.data.interleaver import InterleavedTokenizer, Interleaver

    torch.Tensor.cuda = lambda self: self  # on the CPU
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    rng = random.Random(0)
    cases = []
    for k in range(64):
        duration, rows = dialogue(rng)
        window = WINDOWS[k % len(WINDOWS)]
        path = DATA / "_dialogue.wav"
        path.with_suffix(".json").write_text(json.dumps({"alignments": rows}))
        # train.py's interleaver: Moshi's padding 3, end-of-padding 0, zero token -1.
        interleaver = Interleaver(sp, 12.5, 3, 0, -1, keep_main_only=True, device="cpu")
        tokenizer = InterleavedTokenizer(FrameCount(), interleaver, window)
        n = int(duration * 24000)
        windows = []
        for start in segments(duration, window):
            first = int(start * 24000)
            wav = np.zeros((2, min(int(window * 24000), n - first)), np.float32)
            codes = tokenizer(wav, start, str(path)).codes
            windows.append({"start": start, "text": codes[0, 0].tolist()})
        path.with_suffix(".json").unlink()
        cases.append({"duration": duration, "window": window, "alignments": rows,
                      "windows": windows})
    out = DATA / "windows_reference.json"
    out.write_text(json.dumps({"tokenizer": TOKENIZER.name, "cases": cases}) + "\n")
    print(f"{out}: {len(cases)} dialogues, {sum(len(c['windows']) for c in cases)} windows")


if __name__ == "__main__":
    main()
