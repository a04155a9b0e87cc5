"""moshivis-train's data: the manifest (each kind of line, and every bad line as one line
naming it), the interleaving of a speech sample's words into the text stream, Mimi
encoding of stereo dialogues and Babillage rows (cached), speechless samples, and the
seeded mixing order."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from train_support import build_task_bundle, write_dialogue, write_task

from moshivis_mlx.bundle import load_lm
from moshivis_mlx.models.lm import LmConfig
from moshivis_mlx.text import TextTokenizer, find_tokenizer
from moshivis_mlx.train.batches import Order, collate, shard
from moshivis_mlx.train.dataset import Preparer, Sample
from moshivis_mlx.train.interleave import (
    newline_token,
    text_frames,
    text_stream,
    window_starts,
    window_words,
    word_tokens,
)
from moshivis_mlx.train.manifest import ManifestError, read_alignment, read_manifest

PAD, EPAD = 3, 0


# -- interleaving ---------------------------------------------------------------------------

def words_encoder(table: dict[str, list[int]]):
    return lambda w: table[w]


def test_words_go_at_their_start_frames_with_end_of_padding_before():
    # 12.5 Hz: frame t covers [0.08 t, 0.08 (t + 1)).
    words = [("hello", 0.10, 0.40), ("big", 0.50, 0.60), ("world", 0.58, 0.9)]
    enc = words_encoder({"hello": [10, 11, 12], "big": [20], "world": [30, 31]})
    got = text_stream(words, 14, 12.5, enc, PAD, EPAD).tolist()
    #       0     1   2   3   4    5    6   7   8    9  ...
    assert got == [EPAD, 10, 11, 12, PAD, EPAD, 20, 30, 31, PAD, PAD, PAD, PAD, PAD]


def test_a_word_starting_early_replaces_what_is_left_of_the_previous_one():
    """moshi-finetune's default: the tokens still pending are dropped."""
    words = [("long", 0.0, 0.3), ("next", 0.1, 0.2)]
    enc = words_encoder({"long": [1, 2, 3, 4], "next": [7, 8]})
    # 0.1 s is in frame 1: "next" takes over there, "long" keeps only its first token.
    assert text_stream(words, 5, 12.5, enc, PAD, EPAD).tolist() == [1, 7, 8, PAD, PAD]


def test_no_words_is_all_padding():
    assert text_stream([], 4, 12.5, None, PAD, EPAD).tolist() == [PAD] * 4


def test_an_empty_word_cuts_the_previous_word_short():
    """An empty word has no tokens but still takes over from the word being placed."""
    words = [("long", 0.0, 0.3), ("", 0.1, 0.2), ("next", 0.25, 0.3)]
    enc = words_encoder({"long": [1, 2, 3, 4], "": [], "next": [7]})
    # frame 0 "long"; frame 1 the empty word: nothing left to place; 0.25 s is frame 3.
    assert text_stream(words, 5, 12.5, enc, PAD, EPAD).tolist() == [1, PAD, EPAD, 7, PAD]


def test_word_tokens_strip_and_keep_newlines():
    table = {"a": [5], "b": [6, 7], "\n": [99, 42]}
    enc = words_encoder(table)
    nl = newline_token(enc)
    assert nl == 42  # the last piece of encoding a newline
    assert word_tokens("a\nb", enc, nl) == [5, 42, 6, 7]
    assert word_tokens("a\n\nb", enc, nl) == [5, 42, 42, 6, 7]
    assert word_tokens(" a\n", enc, nl) == [5]  # stripped first
    assert word_tokens("", enc, nl) == [] and word_tokens(" \n ", enc, nl) == []
    # A tokenizer that drops newlines: the lines' tokens follow each other.
    assert newline_token(lambda text: []) is None
    assert word_tokens("a\nb", enc, None) == [5, 6, 7]


TRAIN_DATA = Path(__file__).resolve().parent / "data" / "train"


def newline_tokenizer():
    """A SentencePiece word model that keeps newlines (as Moshi's must for moshi-finetune,
    which takes the last piece of encoding "\\n")."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TRAIN_DATA / "newline_words.model"))


def test_a_word_with_a_newline_is_its_lines_joined_by_the_newline_piece():
    sp = newline_tokenizer()
    red, blue = sp.encode("red"), sp.encode("blue")
    (nl,) = sp.encode("\n")
    assert len(red) == len(blue) == 1 and sp.id_to_piece(nl) == "\u2581\n"
    assert sp.encode("red\nblue") != red + [nl] + blue  # not what encoding it whole gives
    tokens = word_tokens("red\nblue", sp.encode, newline_token(sp.encode))
    assert tokens == red + [nl] + blue
    words = [("red\nblue", 0.1, 0.3), ("\n", 0.4, 0.5), ("green", 0.5, 0.6)]
    got = text_stream(words, 8, 12.5, lambda w: word_tokens(w, sp.encode, nl), PAD, EPAD)
    #               0     1       2     3        4    5     6              7
    assert got.tolist() == [EPAD, *red, nl, *blue, PAD, EPAD, *sp.encode("green"), PAD]


def test_windows_start_every_window_length_before_the_end():
    assert window_starts(2.5, 1.0) == [0.0, 1.0, 2.0]
    assert window_starts(2.0, 1.0) == [0.0, 1.0]  # no empty window at the end
    assert window_starts(0.3, 30.0) == [0.0]
    # Starts are held in single precision, as sphn's segments are.
    assert window_starts(3.0, 1.28)[1] == float(np.float32(1.28)) != 1.28


def test_window_words_start_inside_and_are_timed_from_the_window():
    words = [("a", 0.5, 1.2), ("b", 1.0, 1.1), ("c", 1.9, 2.4), ("d", 2.0, 2.1)]
    # "a" began before the window: dropped whole; "c" runs past its end: kept; "d" starts
    # at the end: the next window's.
    assert window_words(words, 1.0, 1.0) == [("b", 0.0, 1.1 - 1.0), ("c", 1.9 - 1.0, 2.4 - 1.0)]


def test_text_frames_of_a_short_last_window():
    """moshi-finetune gives a window ceil(audio frames x 12.5) text frames, at most the
    window's length."""
    assert text_frames(375, 375, 12.5) == 375
    assert text_frames(7, 13, 12.5) == 13
    assert text_frames(2, 375, 12.5) == 25


def test_windows_equal_moshi_finetune_s(tmp_path):
    """64 random dialogues (other speakers, overlapping, zero-length and empty words, words
    with newlines, words across every cut), cut in windows of 1 to 3.3 s: every window's
    text stream is the one moshi-finetune's InterleavedTokenizer built from the same
    alignments (recorded once in the reference file, with the dialogues and settings), with
    its short last windows' text run on."""
    ref = json.loads((TRAIN_DATA / "windows_reference.json").read_text())
    sp = newline_tokenizer()
    nl = newline_token(sp.encode)
    encode = lambda w: word_tokens(w, sp.encode, nl)  # noqa: E731
    n_windows = 0
    for k, case in enumerate(ref["cases"]):
        path = tmp_path / f"{k}.json"
        path.write_text(json.dumps({"alignments": case["alignments"]}))
        words, _ = read_alignment(path, "test")
        window, samples = case["window"], int(case["duration"] * 24000)
        window_frames = math.ceil(window * 12.5)
        starts = window_starts(case["duration"], window)
        assert starts == [w["start"] for w in case["windows"]]
        for start, want in zip(starts, case["windows"]):
            audio = min(int(window * 24000), samples - int(start * 24000))
            n_text = text_frames(min(window_frames, math.ceil(audio / 1920)), window_frames,
                                 12.5)
            got = text_stream(window_words(words, start, window), n_text, 12.5, encode, PAD,
                              EPAD).tolist()
            assert got + [-1] * (window_frames - n_text) == want["text"], (k, start)
            n_windows += 1
    assert n_windows == 219


# -- manifests ------------------------------------------------------------------------------

def one_line_error(path: Path, lines: list[object]) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_manifest_kinds_and_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    manifest, _ = write_task(tmp_path / "data", 2, "m", 0)
    wav, alignment = write_dialogue(tmp_path / "data", "talk", 1.0, [("hi", 0.2, 0.4)])
    lines = manifest.read_text().splitlines()
    lines.append(json.dumps({"image": "images/m-000.png", "audio": "talk.wav",
                             "alignment": "talk.json"}))
    manifest.write_text("\n".join(lines) + "\n\n")
    entries = read_manifest(manifest)
    assert [e.kind for e in entries] == ["speechless", "speechless", "speech"]
    assert entries[0].image == tmp_path / "data/images/m-000.png"
    assert entries[0].turns[1].role == "assistant"
    assert entries[2].audio == wav and entries[2].words == [("hi", 0.2, 0.4)]
    assert entries[2].where.endswith("m.jsonl:3")


def test_alignment_keeps_the_assistant_s_words_in_order(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "a.json").write_text(json.dumps({"alignments": [
        ["world", [1.0, 1.3], "SPEAKER_MAIN"], ["user", [0.1, 0.5], "SPEAKER_OTHER"],
        ["hello", [0.5, 0.9], "SPEAKER_MAIN"], ["", [2.0, 2.1], "SPEAKER_MAIN"],
        ["bad", [3.0, 3.0], "SPEAKER_MAIN"], ["plain", [4.0, 4.2]],
        ["two\nlines ", [4.5, 4.6], "SPEAKER_MAIN"]]}))
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "audio": "a.wav", "alignment": "a.json"}))
    # Empty words stay (they cut the word before short); words are kept as written.
    assert read_manifest(m)[0].words == [("hello", 0.5, 0.9), ("world", 1.0, 1.3),
                                         ("", 2.0, 2.1), ("plain", 4.0, 4.2),
                                         ("two\nlines ", 4.5, 4.6)]


def test_every_bad_line_is_one_line_naming_it(tmp_path):
    manifest, _ = write_task(tmp_path, 1, "m", 0)
    good = json.loads(manifest.read_text().splitlines()[0])
    (tmp_path / "talk.wav").write_bytes(b"RIFF")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "shape.json").write_text(json.dumps({"alignments": [["w", 0.1]]}))
    m = tmp_path / "bad.jsonl"
    cases = [
        ({**good, "image": "images/missing.png"}, r"bad\.jsonl:2: image .*missing\.png: no such"),
        ({"image": good["image"], "audio": "nope.wav", "alignment": "broken.json"},
         r"bad\.jsonl:2: audio .*nope\.wav: no such file"),
        ({"image": good["image"], "audio": "talk.wav", "alignment": "broken.json"},
         r"bad\.jsonl:2: alignment .*broken\.json: unreadable"),
        ({"image": good["image"], "audio": "talk.wav", "alignment": "shape.json"},
         r"bad\.jsonl:2: alignment .*entry 0 .*expected \[word, \[start, end\], speaker\]"),
        ({"image": good["image"], "audio": "talk.wav"}, r"bad\.jsonl:2: .*needs 'alignment'"),
        ("{oops", r"bad\.jsonl:2: not JSON"),
        ({**good, "colour": 1}, r"bad\.jsonl:2: unknown key 'colour'"),
        ({"image": good["image"]}, r"bad\.jsonl:2: a sample has exactly one of"),
        ({**good, "turns": [{"role": "user", "text": "hi"}]},
         r"bad\.jsonl:2: no assistant turn"),
        ({**good, "turns": [{"role": "robot", "text": "hi"}]}, r"bad\.jsonl:2: turn 0 must"),
    ]
    for line, pattern in cases:
        message = one_line_error(m, [good, line])
        assert re.search(pattern, message), message
    m.write_text("\n\n")
    with pytest.raises(ManifestError, match=r"bad\.jsonl: no samples \(an empty split\)"):
        read_manifest(m)
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "absent.jsonl")


def test_babillage_rows_are_checked(tmp_path):
    data = babillage_file(tmp_path)
    (tmp_path / "a.png").write_bytes(b"x")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "babillage": data.name, "sample_id": 11}) + "\n")
    assert read_manifest(m)[0].kind == "babillage"
    assert "no sample_id 99" in one_line_error(
        m, [{"image": "a.png", "babillage": data.name, "sample_id": 99}])
    assert "'sample_id' must be an integer" in one_line_error(
        m, [{"image": "a.png", "babillage": data.name, "sample_id": "11"}])


# -- samples --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_task_bundle(tmp_path_factory.mktemp("task") / "bundle")


def preparer(bundle: Path, cache: Path, speechless: str = "zero", max_seconds: float = 30.0,
             text_past_audio: bool = False):
    cfg = load_lm(bundle).cfg
    tok = TextTokenizer(find_tokenizer(bundle), cfg.text_padding_ids)
    return Preparer(bundle, cfg, tok, cache, max_seconds, speechless,
                    text_past_audio=text_past_audio), cfg, tok


def test_speechless_samples_hold_the_whole_transcript(bundle, tmp_path):
    manifest, colours = write_task(tmp_path, 2, "m", 0)
    entries = read_manifest(manifest)
    p, cfg, tok = preparer(bundle, tmp_path / "cache")
    p.encode_all(entries)
    s = p.samples(entries)[0]
    tokens = tok.sp.encode(entries[0].turns[0].text) + tok.sp.encode(colours[0])
    assert s.codes.shape == (17, len(tokens)) and not s.speech
    assert s.codes[0].tolist() == tokens and (s.codes[1:] == -1).all()
    assert s.user_text.tolist() == [True] * (len(tokens) - 1) + [False]
    assert p.images.get(s.image).shape == (16, cfg.image_dim)
    quiet = preparer(bundle, tmp_path / "cache", "silence")[0].samples(entries)[0]
    assert (quiet.codes[0] == s.codes[0]).all()
    # Both audio streams: the tiny Mimi's one code of silence, every frame.
    assert (quiet.codes[1:] == quiet.codes[1:, :1]).all() and (quiet.codes[1:] >= 0).all()


def window_mimi_codes(bundle: Path, pcm: np.ndarray, start: float, seconds: float):
    """Mimi's codes [16, frames] of one window of a 24 kHz stereo dialogue, encoded alone."""
    import mlx.core as mx

    from moshivis_mlx.bundle import load_mimi

    mimi = load_mimi(bundle)
    first = int(start * 24000)
    piece = pcm[first: first + int(seconds * 24000)]
    x = np.concatenate([piece, np.zeros((-len(piece) % 1920, 2), np.float32)])
    return np.concatenate([np.asarray(mimi.encode(mx.array(x[:, c]))) for c in (0, 1)])


def test_speech_samples_mimi_codes_of_both_channels_and_the_words(bundle, tmp_path):
    from moshivis_mlx.resample import resample
    from moshivis_mlx.wav import read_wav

    words = [("what", 0.30, 0.50), ("colour", 0.9, 1.2)]
    entries = one_dialogue(tmp_path, "talk", 2.0, words, rate=16000)
    p, cfg, tok = preparer(bundle, tmp_path / "cache", max_seconds=1.0)
    p.encode_all(entries)
    samples = p.samples(entries)
    assert [s.frames for s in samples] == [13, 13]  # 2 s: two windows of 1 s, 12.5 frames
    assert samples[1].where.endswith("(part 2)") and all(s.speech for s in samples)
    pcm, rate = read_wav(tmp_path / "talk.wav")
    pcm = np.stack([resample(pcm[:, c], rate, 24000) for c in (0, 1)], axis=1)
    for s, start in zip(samples, (0.0, 1.0)):
        # Each window's audio is encoded on its own, as moshi-finetune encodes a sample.
        np.testing.assert_array_equal(s.codes[1:], window_mimi_codes(bundle, pcm, start, 1.0))
    expected = text_stream(words, 13, 12.5, tok.sp.encode, PAD, EPAD)
    np.testing.assert_array_equal(samples[0].codes[0], expected)
    assert expected[3] == tok.sp.encode("what")[0] and expected[2] == EPAD
    assert (samples[1].codes[0] == PAD).all()  # "colour" began in the first window
    # Cached: a second preparer encodes nothing (no Mimi is loaded).
    again, _, _ = preparer(bundle, tmp_path / "cache", max_seconds=1.0)
    again.encode_all(entries)
    assert again._mimi is None and again._vision is None
    for s, t in zip(samples, again.samples(entries)):
        np.testing.assert_array_equal(s.codes, t.codes)


def one_dialogue(tmp_path, name: str, seconds: float, words, **kwargs) -> list:
    """A manifest of one picture and one dialogue of `words` ([word, start, end]), read."""
    write_task(tmp_path, 1, "m", 0)
    write_dialogue(tmp_path, name, seconds, words, **kwargs)
    m = tmp_path / "speech.jsonl"
    m.write_text(json.dumps({"image": "images/m-000.png", "audio": f"{name}.wav",
                             "alignment": f"{name}.json"}) + "\n")
    return read_manifest(m)


def test_windows_of_a_long_dialogue_are_built_as_moshi_finetune_builds_them(bundle, tmp_path):
    """A 2.5 s dialogue in 1 s windows (13 frames each, the last one 0.5 s of audio = 7
    frames), every frame worked by hand from moshi-finetune's rules."""
    write_task(tmp_path, 1, "m", 0)
    words = [("red", 0.10, 0.30),                 # frame 1 of window 0
             ("what colour is the", 0.90, 1.20),  # frame 11 of window 0: 4 tokens, 2 fit
             ("blue", 1.20, 1.40),                # frame 2 of window 1 (1.2 - 1.0 = 0.2 s)
             ("green yellow", 1.97, 2.10),        # frame 12 of window 1, its last
             ("is the shape?", 2.00, 2.30),       # frame 0 of window 2
             ("", 2.10, 2.15),                    # frame 1 of window 2: cuts the above short
             ("red", 2.30, 2.40)]                 # frame 3 of window 2
    entries = one_dialogue(tmp_path, "long", 2.5, words)
    p, cfg, tok = preparer(bundle, tmp_path / "cache", max_seconds=1.0)
    p.encode_all(entries)
    samples = p.samples(entries)
    red, blue = tok.sp.encode("red"), tok.sp.encode("blue")
    what, colour = tok.sp.encode("what colour is the")[:2]
    green = tok.sp.encode("green yellow")[0]
    is_ = tok.sp.encode("is the shape?")[0]
    o = PAD
    assert [s.codes[0].tolist() for s in samples] == [
        # 0     1     2  3  4  5  6  7  8  9  10    11    12
        [EPAD, *red, o, o, o, o, o, o, o, o, EPAD, what, colour],
        # the tail of "what colour is the" is not carried over; no end-of-padding in the
        # last frame for the word starting right after the cut
        [o, EPAD, *blue, o, o, o, o, o, o, o, o, EPAD, green],
        # the word at the window's start has no end-of-padding before it
        [is_, o, EPAD, *red, o, o, o],
    ]
    assert [s.frames for s in samples] == [13, 13, 7]
    assert [s.where[-8:] for s in samples] == ["(part 1)", "(part 2)", "(part 3)"]
    # moshi-finetune's short last window: the text runs on in padding to 13 frames
    # (ceil(7 x 12.5) > 13), over no audio.
    q = preparer(bundle, tmp_path / "cache", max_seconds=1.0, text_past_audio=True)[0]
    last = q.samples(entries)[-1]
    assert last.codes[0].tolist() == [is_, o, EPAD, *red] + [o] * 9
    assert (last.codes[1:, 7:] == -1).all()
    np.testing.assert_array_equal(last.codes[:, :7], samples[-1].codes)


def test_a_mono_wav_is_refused_naming_the_line(bundle, tmp_path):
    write_task(tmp_path, 1, "m", 0)
    write_dialogue(tmp_path, "mono", 0.5, [("hi", 0.1, 0.2)], channels=1)
    m = tmp_path / "speech.jsonl"
    m.write_text(json.dumps({"image": "images/m-000.png", "audio": "mono.wav",
                             "alignment": "mono.json"}) + "\n")
    p, _, _ = preparer(bundle, tmp_path / "cache")
    with pytest.raises(ManifestError, match=r"speech\.jsonl:1: audio .*mono\.wav: 1 channel"):
        p.encode_all(read_manifest(m))


def babillage_file(root: Path) -> Path:
    """Babillage's coco schema with one row: a 0.5 s question, a 0.4 s answer of two
    words (at 16 kHz, as Babillage stores it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from eval_support import tone_bytes

    table = pa.table({
        "sample_id": [11], "image_id": [42],
        "question_audio": [{"bytes": tone_bytes(0.5), "path": "q.wav"}],
        "question_transcript": [["what", "is", "it"]],
        "question_alignment": [[[0.0, 0.1], [0.1, 0.2], [0.2, 0.4]]],
        "answer_audio": [{"bytes": tone_bytes(0.4), "path": "a.wav"}],
        "answer_transcript": [["a", "house"]],
        "answer_alignment": [[[0.05, 0.1], [0.2, 0.35]]],
    })
    path = root / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


def test_babillage_rows_become_a_question_then_an_answer(bundle, tmp_path):
    data = babillage_file(tmp_path)
    write_task(tmp_path, 1, "m", 0)
    m = tmp_path / "b.jsonl"
    m.write_text(json.dumps({"image": "images/m-000.png", "babillage": data.name,
                             "sample_id": 11}) + "\n")
    entries = read_manifest(m)
    p, cfg, tok = preparer(bundle, tmp_path / "cache")
    p.encode_all(entries)
    (s,) = p.samples(entries)
    assert s.speech and s.frames == 12  # 0.9 s: one window
    # The answer's words are shifted by the question's 0.5 s: frames 6 and 8.
    expected = text_stream([("a", 0.55, 0.6), ("house", 0.7, 0.85)], 12, 12.5,
                           tok.sp.encode, PAD, EPAD)
    np.testing.assert_array_equal(s.codes[0], expected)
    assert (s.codes[0] != PAD).sum() >= 2


# -- order and batches -----------------------------------------------------------------------

def fake_samples(n_speech: int, n_text: int) -> list[Sample]:
    return [Sample(np.zeros((17, 3 + i % 5), np.int32), f"img{i}", i < n_speech, f"m:{i}")
            for i in range(n_speech + n_text)]


def test_order_mixes_by_p_audio_and_is_seeded():
    samples = fake_samples(30, 70)
    order = Order(samples, 0.25, seed=3)
    drawn = [b for _, b in zip(range(400), order.batches(4))]
    flat = [i for b in drawn for i in b]
    share = np.mean([samples[i].speech for i in flat])
    assert 0.2 < share < 0.3
    mixed = np.mean([len({samples[i].speech for i in b}) == 2 for b in drawn])
    assert mixed > 0.5  # most batches hold both kinds
    assert flat == [i for b in zip(range(400), Order(samples, 0.25, 3).batches(4))
                    for i in b[1]]
    assert flat[:40] != [i for _, b in zip(range(10), Order(samples, 0.25, 4).batches(4))
                         for i in b]
    # Every sample of a kind comes once per epoch of that kind.
    speech = [i for i in flat if samples[i].speech][:30]
    assert sorted(speech) == list(range(30))
    # Resuming at batch k replays the same order.
    tail = [b for _, b in zip(range(5), order.batches(4, start=7))]
    assert tail == drawn[7:12]


def test_order_with_one_kind_only():
    only_text = fake_samples(0, 5)
    assert Order(only_text, 0.25, 0).p_audio == 0.0
    assert Order(fake_samples(5, 0), 0.25, 0).p_audio == 1.0


def test_collate_pads_with_the_zero_token_and_shards():
    samples = fake_samples(1, 2)
    samples[0].codes[:] = 7
    codes, user = collate(samples, 17)
    assert codes.shape == (3, 17, 8) and (codes[0, :, 3:] == -1).all() and user.shape == (3, 8)
    assert shard([1, 2, 3, 4], 0, 2) == [1, 2] and shard([1, 2, 3, 4], 1, 2) == [3, 4]


def test_loss_weights_follow_the_config_delays():
    from moshivis_mlx.train.loss import LossConfig, loss_weights

    cfg = LmConfig(dim=8, num_heads=1, num_layers=1, ffn_hidden=8, text_card=8, card=8)
    codes = np.zeros((1, 17, 5), dtype=np.int32)
    codes[0, 0] = [PAD, 5, EPAD, 6, -1]
    w_text, w_audio = loss_weights(codes, cfg, LossConfig(audio_codebooks=3))
    assert w_text.tolist() == [[0.5, 1.0, 0.5, 1.0, 0.0]]
    assert w_audio[0, 0].tolist() == [100.0] * 5  # semantic: no delay
    assert w_audio[0, 1].tolist() == [1, 1, 1, 1, 0] and w_audio.shape == (1, 3, 5)
