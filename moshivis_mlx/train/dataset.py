"""Manifest entries -> training samples: the 17 token streams of each, and its image's tokens.

The image encoder and Mimi are frozen, so their outputs are computed once and cached on
disk, keyed by the file (path, size, modification time) and by the weights that made them:

    CACHE/images/<key>.safetensors   SigLIP tokens [N, image_dim] of one picture
    CACHE/audio/<key>.safetensors    Mimi codes [16, T] of one dialogue (assistant, user)

A rerun, a resumed run, every process of a data-parallel run and the validation split
share them. The streams are then built in Kyutai's training layout (row 0 text, rows 1-8
the model's codebooks, rows 9-16 the user's, -1 for "not given"):

* speechless: the transcript's tokens, user and assistant turns alike, one per step, no
  padding; the audio rows are the zero token (-1; `speechless_audio="silence"` fills them
  with Mimi's codes of silence instead, which is what moshivis-eval's text mode and a
  quiet user feed the model); no audio loss.
* speech: moshi-finetune's samples. The dialogue is cut into windows of `max_seconds`
  (`interleave.window_starts`), each a sample: Mimi's codes of both channels of that
  window, encoded on their own, and the assistant's words that start in the window placed
  at their frames (`interleave.window_words`, `interleave.text_stream`).

A dialogue is read forward in bounded blocks (a WAV block by block through the streaming
resampler) and each window is Mimi-encoded frame by frame with the streaming encoder,
reset at every window: the codes are those of encoding the window whole, in memory that
does not grow with the dialogue's length or the window's (a 30 s window encoded whole
takes about 4 GB with Mimi's full-size encoder; frame by frame, some 20 MB).

What a sample loses is reported, never silently dropped (`Preparer.notes`, written to the
run's log and summed up in its summary): a speechless transcript cut to the window's
length, words that end before they start or that start after the audio's end.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..adapters import save_safetensors_atomic
from ..errors import MoshivisError
from ..models.mimi import MimiConfig
from .interleave import (
    newline_token,
    text_frames,
    text_stream,
    window_starts,
    window_words,
    word_tokens,
)
from .manifest import BabillageFiles, Entry, ManifestError, Word

CACHE_VERSION = 3
SPEECHLESS_AUDIO = ("zero", "silence")
NOTE_KINDS = {"cut": "cut to --max-seconds", "dropped_words": "with words dropped"}
"""What a sample may lose, as the run's summary says it."""
FRAME_RATE = MimiConfig().frame_rate
"""Mimi's frames per second."""


@dataclass
class Sample:
    """One training sequence."""

    codes: np.ndarray
    """[1 + n_q, T] int32, training layout (not delayed), -1 where nothing is given."""
    image: str
    """Its image's cache key."""
    speech: bool
    where: str
    user_text: np.ndarray | None = None
    """[T] bool: the text tokens that are the user's (speechless samples)."""

    @property
    def frames(self) -> int:
        return self.codes.shape[1]


def _file_key(path: Path, *extra: object) -> str:
    st = path.stat()
    text = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, CACHE_VERSION, *extra])
    return hashlib.sha1(text.encode()).hexdigest()


def _weights_id(bundle: Path, section: Any, stem: str) -> str:
    """What identifies a model of the bundle: its config and its weights files' stats."""
    from ..bundle import weight_files

    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(bundle, stem)]
    return hashlib.sha1(json.dumps([section, stats], sort_keys=True).encode()).hexdigest()[:16]


class ImageStore:
    """Cached image tokens, read on demand (a few recent ones kept in memory)."""

    def __init__(self, root: Path, keep: int = 64):
        self.root = Path(root) / "images"
        self.keep = keep
        self._recent: OrderedDict[str, mx.array] = OrderedDict()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, key: str, tokens: mx.array) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self.path(key), {"tokens": tokens})

    def get(self, key: str) -> mx.array:
        if key not in self._recent:
            self._recent[key] = mx.load(str(self.path(key)))["tokens"]
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        self._recent.move_to_end(key)
        return self._recent[key]


Progress = Callable[[str, int, int], None]
"""progress(what, done, total)"""


class Preparer:
    """Encodes what is not cached yet (images with SigLIP, dialogues with Mimi) and builds
    the samples. The models are loaded only if something needs encoding."""

    def __init__(self, bundle: Path, lm_cfg, tokenizer, cache: Path, max_seconds: float,
                 speechless_audio: str = "zero", progress: Progress | None = None,
                 rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
                 babillage: BabillageFiles | None = None, text_past_audio: bool = False):
        from ..bundle import read_config

        if speechless_audio not in SPEECHLESS_AUDIO:
            raise MoshivisError(f"speechless audio must be one of {SPEECHLESS_AUDIO}")
        self.bundle = Path(bundle)
        self.cfg = lm_cfg
        self.tokenizer = tokenizer
        self.cache = Path(cache)
        self.max_seconds = float(max_seconds)
        self.max_frames = max(1, math.ceil(self.max_seconds * FRAME_RATE))
        self._newline = newline_token(self._encode_text)
        self.text_past_audio = text_past_audio
        self.speechless_audio = speechless_audio
        self.progress = progress or (lambda what, done, total: None)
        self.rank, self.world = rank, world
        self.barrier = barrier or (lambda: None)
        self.images = ImageStore(self.cache)
        bundle_cfg = read_config(self.bundle)
        self._vision_id = (_weights_id(self.bundle, bundle_cfg.get("vision"), "vision")
                           if bundle_cfg.get("vision") else None)
        self._mimi_id = (_weights_id(self.bundle, bundle_cfg.get("mimi"), "mimi")
                         if bundle_cfg.get("mimi") else None)
        self._vision = None
        self._mimi = None
        self.babillage = babillage or BabillageFiles()
        self._encoder = None
        self.notes: list[dict[str, Any]] = []
        """What samples lost: {"sample", "kind" (a key of NOTE_KINDS), "note"}, one each."""

    # -- the frozen encoders ---------------------------------------------------------------

    def vision(self):
        if self._vision is None:
            from ..bundle import load_vision

            self._vision = load_vision(self.bundle)
        return self._vision

    def mimi(self):
        if self._mimi is None:
            from ..bundle import load_mimi

            if self._mimi_id is None:
                raise MoshivisError(f"{self.bundle} has no Mimi codec: it cannot encode the "
                                    f"speech samples", "use a bundle with mimi.safetensors")
            self._mimi = load_mimi(self.bundle, self.cfg.dep_q)
        return self._mimi

    def release(self) -> None:
        """Drops the encoders (the 7B model needs the memory)."""
        self._vision = self._mimi = self._encoder = None
        mx.clear_cache()

    # -- keys ---------------------------------------------------------------------------------

    def image_key(self, e: Entry) -> str:
        if self._vision_id is None:
            raise MoshivisError(f"{self.bundle} has no image encoder", "use a MoshiVis bundle")
        return _file_key(e.image, self._vision_id)

    def audio_key(self, e: Entry) -> str:
        if e.kind == "babillage":
            return _file_key(e.babillage, e.sample_id, self._mimi_id, self.max_seconds)
        return _file_key(e.audio, self._mimi_id, self.max_seconds)

    def audio_path(self, key: str) -> Path:
        return self.cache / "audio" / f"{key}.safetensors"

    # -- encoding -----------------------------------------------------------------------------

    def encode_all(self, entries: list[Entry]) -> None:
        """Encodes every image and dialogue not in the cache: each process its share, then
        (after the barrier) whatever another process could not leave in a shared cache."""
        images: dict[str, Entry] = {}
        audio: dict[str, Entry] = {}
        for e in entries:
            images.setdefault(self.image_key(e), e)
            if e.speech:
                audio.setdefault(self.audio_key(e), e)
        for share in (True, False):
            todo_i = [(k, e) for k, e in images.items() if not self.images.has(k)]
            todo_a = [(k, e) for k, e in audio.items() if not self.audio_path(k).exists()]
            if share:
                todo_i = todo_i[self.rank::self.world]
                todo_a = todo_a[self.rank::self.world]
            for n, (key, e) in enumerate(todo_i):
                self.progress("image tokens", n, len(todo_i))
                self.images.put(key, self._encode_image(e))
            if todo_i:
                self.progress("image tokens", len(todo_i), len(todo_i))
            for n, (key, e) in enumerate(todo_a):
                self.progress("Mimi codes", n, len(todo_a))
                codes, words, windows, dropped = self._encode_dialogue(e)
                self.audio_path(key).parent.mkdir(parents=True, exist_ok=True)
                save_safetensors_atomic(self.audio_path(key), {"codes": mx.array(codes)},
                                        {"words": json.dumps(words),
                                         "windows": json.dumps(windows),
                                         "dropped": json.dumps(dropped),
                                         "frame_rate": repr(self.mimi().frame_rate)})
            if todo_a:
                self.progress("Mimi codes", len(todo_a), len(todo_a))
            if share:
                self.barrier()

    def _encode_image(self, e: Entry) -> mx.array:
        from ..errors import ImageError

        try:
            return self.vision().encode_image(e.image)
        except ImageError as err:
            raise ManifestError(f"{e.where}: {err}") from None

    def _encode_dialogue(self, e: Entry
                         ) -> tuple[np.ndarray, list[Word], list[tuple[float, int]], int]:
        """Mimi codes [16, T] (assistant's 8 codebooks, then the user's) of each window of
        one dialogue, one after the other; the assistant's words; each window's start (s)
        and number of frames; and how many of the words end before they start (dropped)."""
        rate = self.mimi().sample_rate
        if e.kind == "speech":
            dialogue: _Dialogue = _WavDialogue(e, rate)
            words, dropped = e.words, e.dropped
        else:
            dialogue, words, dropped = self._babillage_dialogue(e, rate)
        window = int(self.max_seconds * rate)
        pieces, windows = [], []
        for start in window_starts(dialogue.length / rate, self.max_seconds):
            codes = self._encode_window(dialogue.take(int(start * rate), window))
            pieces.append(codes)
            windows.append((start, codes.shape[1]))
        dialogue.close()
        return np.concatenate(pieces, axis=1), list(words), windows, dropped

    def _encode_window(self, piece: np.ndarray) -> np.ndarray:
        """Mimi codes [16, frames] of one window's audio [2, n], encoded on their own as
        moshi-finetune encodes each sample: no context from the audio before it."""
        frames = min(self.max_frames, math.ceil(piece.shape[1] / self.mimi().frame_size))
        return np.concatenate([self.stream_codes(piece[c], frames) for c in range(2)],
                              axis=0).astype(np.int32)

    def stream_codes(self, pcm: np.ndarray, frames: int) -> np.ndarray:
        """The first `frames` frames of Mimi's codes [dep_q, frames] of mono `pcm` (zeros
        after its end), encoded frame by frame from a fresh stream: what encoding it whole
        gives (`Mimi.encode`), in memory that does not grow with its length."""
        mimi = self.mimi()
        if self._encoder is None:
            self._encoder = mimi.streaming_encoder()
        enc, size = self._encoder, mimi.frame_size
        enc.reset()
        out = np.empty((enc.num_codebooks, frames), dtype=np.int32)
        frame = np.zeros(size, dtype=np.float32)
        for t in range(frames):
            chunk = pcm[t * size: (t + 1) * size]
            frame[: len(chunk)] = chunk
            frame[len(chunk):] = 0.0
            out[:, t] = enc.step(frame)
        return out

    def _babillage_dialogue(self, e: Entry, rate: int) -> tuple[_Dialogue, list[Word], int]:
        """The user asks (question audio), then the assistant answers (answer audio)."""
        from ..babillage import DataError, decode_audio
        from ..resample import resample

        data = self.babillage.get(e.babillage, e.where)
        sample = data.find(e.sample_id)
        name = f"{e.babillage.name} sample {e.sample_id}"
        try:
            q, q_rate = decode_audio(data.cell(sample, "question_audio"), name)
            a, a_rate = decode_audio(data.cell(sample, "answer_audio"), name)
        except DataError as err:
            raise ManifestError(f"{e.where}: {err}") from None
        q, a = resample(q, q_rate, rate), resample(a, a_rate, rate)
        words, dropped = babillage_words(data.cell(sample, "answer_transcript"),
                                         data.cell(sample, "answer_alignment"),
                                         f"{e.where}: {name}")
        offset = len(q) / rate
        aligned = [(w, s + offset, t + offset) for w, s, t in words]
        return _ArrayDialogue([(len(q), a), (0, q)]), aligned, dropped

    # -- samples ------------------------------------------------------------------------------

    def samples(self, entries: list[Entry]) -> list[Sample]:
        """The samples of `entries` (everything must be encoded already)."""
        out: list[Sample] = []
        for e in entries:
            image = self.image_key(e)
            if e.speech:
                out += self._speech_samples(e, image)
            else:
                out.append(self._speechless_sample(e, image))
        return out

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.sp.encode(text))

    def _encode_word(self, word: str) -> list[int]:
        """An aligned word's tokens, newlines kept as moshi-finetune keeps them."""
        return word_tokens(word, self._encode_text, self._newline)

    def _speechless_sample(self, e: Entry, image: str) -> Sample:
        tokens, user = [], []
        for turn in e.turns:
            ids = self._encode_text(turn.text)
            tokens += ids
            user += [turn.role == "user"] * len(ids)
        if len(tokens) > self.max_frames:
            self._note(e.where, "cut", f"{len(tokens)} text tokens, the first "
                                       f"{self.max_frames} kept (--max-seconds "
                                       f"{self.max_seconds:g} at {FRAME_RATE:g} tokens a "
                                       f"second)")
        tokens, user = tokens[: self.max_frames], user[: self.max_frames]
        codes = np.full((1 + self.cfg.n_q, len(tokens)), -1, dtype=np.int32)
        codes[0] = tokens
        if self.speechless_audio == "silence":
            # Both sides silent from the start: Mimi's codes of a silent stream.
            silence = self.silence_codes()[:, : len(tokens)]
            codes[1: 1 + self.cfg.dep_q] = silence
            codes[1 + self.cfg.dep_q:] = silence
        return Sample(codes, image, False, e.where, np.array(user, dtype=bool))

    def silence_codes(self) -> np.ndarray:
        """Mimi's codes of `max_frames` (at least 8) frames of silence [dep_q, frames]
        (cached)."""
        frames = max(8, self.max_frames)
        path = self.cache / "audio" / f"silence-{self._mimi_id}-{frames}.safetensors"
        if not path.exists():
            codes = self.stream_codes(np.zeros(0, dtype=np.float32), frames)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(path, {"codes": mx.array(np.asarray(codes, np.int32))})
        return np.asarray(mx.load(str(path))["codes"])

    def _speech_samples(self, e: Entry, image: str) -> list[Sample]:
        """One sample per window of the dialogue."""
        path = self.audio_path(self.audio_key(e))
        arrays, meta = mx.load(str(path), return_metadata=True)
        codes_audio = np.asarray(arrays["codes"])
        # A speech file's words are read afresh (its alignment may have been edited since
        # its audio was encoded); a Babillage row's were cached with its audio.
        words = e.words if e.kind == "speech" else [tuple(w) for w in json.loads(meta["words"])]
        dropped = e.dropped if e.kind == "speech" else int(json.loads(meta["dropped"]))
        windows = json.loads(meta["windows"])
        rate = float(meta["frame_rate"])
        out, first, placed = [], 0, 0
        for k, (start, frames) in enumerate(windows):
            mine = window_words(words, start, self.max_seconds)
            codes = self._window_codes(codes_audio[:, first: first + frames], mine, rate)
            placed += sum(1 for _, s, _ in mine if s * rate < codes.shape[1])
            first += frames
            where = e.where if len(windows) == 1 else f"{e.where} (part {k + 1})"
            out.append(Sample(codes, image, True, where))
        early = sum(1 for _, s, _ in words if s < 0)
        late = len(words) - placed - early
        reasons = ([f"{dropped} end before they start"] if dropped else []) + \
                  ([f"{early} start before 0 s"] if early else []) + \
                  ([f"{late} start after the audio's end ({first / rate:.2f} s)"] if late else [])
        if reasons:
            self._note(e.where, "dropped_words", f"{dropped + early + late} of "
                                                 f"{len(words) + dropped} words dropped: "
                                                 f"{'; '.join(reasons)}")
        return out

    def _note(self, where: str, kind: str, note: str) -> None:
        self.notes.append({"sample": where, "kind": kind, "note": note})

    def _window_codes(self, audio: np.ndarray, words: list[Word], rate: float) -> np.ndarray:
        """[1 + n_q, T] codes of one window: its text (words timed from the window's start),
        its audio, -1 where nothing is given. The text stops with the audio, unless
        `text_past_audio` (moshi-finetune's short last window, see `text_frames`); the
        -1 that moshi-finetune pads each window with to its full length is left out (no
        loss, and the model is causal)."""
        cfg = self.cfg
        n_audio = audio.shape[1]
        n_text = (text_frames(n_audio, self.max_frames, rate) if self.text_past_audio
                  else n_audio)
        dep_q, n_user = cfg.dep_q, cfg.n_q - cfg.dep_q
        codes = np.full((1 + cfg.n_q, max(n_audio, n_text)), -1, dtype=np.int32)
        codes[0, :n_text] = text_stream(words, n_text, rate, self._encode_word,
                                        cfg.text_padding_id, cfg.end_of_text_padding_id)
        codes[1: 1 + dep_q, :n_audio] = audio[:dep_q]
        codes[1 + dep_q:, :n_audio] = audio[dep_q: dep_q + n_user]
        return codes


# -- dialogues, read forward in bounded pieces ------------------------------------------------

class _Dialogue:
    """A dialogue's two channels (assistant, user) at Mimi's rate: `length` samples, read
    forward with `take` (each call at or after the previous one's start)."""

    length: int

    def take(self, first: int, n: int) -> np.ndarray:
        """Samples [first, first + n) of both channels [2, m] (m < n at the end)."""
        raise NotImplementedError

    def close(self) -> None:
        """Lets go of what it reads from."""


class _ArrayDialogue(_Dialogue):
    """Channels held in memory, each (offset, samples): silence before and after."""

    def __init__(self, channels: list[tuple[int, np.ndarray]]):
        self.channels = channels
        self.length = max(offset + len(x) for offset, x in channels)

    def take(self, first: int, n: int) -> np.ndarray:
        end = min(first + n, self.length)
        out = np.zeros((len(self.channels), max(0, end - first)), dtype=np.float32)
        for c, (offset, x) in enumerate(self.channels):
            lo, hi = max(first, offset), min(end, offset + len(x))
            if lo < hi:
                out[c, lo - first: hi - first] = x[lo - offset: hi - offset]
        return out


class _WavDialogue(_Dialogue):
    """A stereo WAV read block by block and resampled as a stream: only the window being
    taken (and a block) is ever in memory. The samples are those of resampling the whole
    file (`resample.resample`: the same filter, `round(frames * rate / file rate)` of
    them)."""

    def __init__(self, e: Entry, rate: int):
        from ..errors import AudioFileError
        from ..resample import Resampler
        from ..wav import WavReader

        try:
            self.reader = WavReader(e.audio)
        except AudioFileError as err:
            raise ManifestError(f"{e.where}: {err}") from None
        r = self.reader
        if r.channels != 2:
            r.close()
            raise ManifestError(f"{e.where}: audio {e.audio}: {r.channels} channel(s); a speech "
                                f"sample is a stereo WAV (channel 0 the assistant, 1 the user)")
        self.length = round(r.frames * rate / r.sample_rate)
        self.resamplers = [Resampler(r.sample_rate, rate) for _ in range(2)]
        self.buf = np.zeros((2, 0), dtype=np.float32)
        self.buf_start = 0
        self.produced = 0
        self.done = False

    def _more(self) -> bool:
        """Appends the next block to the buffer; False at the end."""
        if self.done:
            return False
        block = self.reader.read(self.reader.sample_rate)  # a second at a time
        if len(block):
            new = np.stack([rs.process(block[:, c]) for c, rs in enumerate(self.resamplers)])
        else:
            self.reader.close()
            self.done = True
            new = np.stack([rs.flush() for rs in self.resamplers])
            short = self.length - self.produced - new.shape[1]
            if short > 0:
                new = np.concatenate([new, np.zeros((2, short), dtype=np.float32)], axis=1)
        new = new[:, : max(0, self.length - self.produced)]
        self.produced += new.shape[1]
        self.buf = np.concatenate([self.buf, new], axis=1)
        return True

    def take(self, first: int, n: int) -> np.ndarray:
        end = min(first + n, self.length)
        while self.buf_start + self.buf.shape[1] < end and self._more():
            drop = min(max(0, first - self.buf_start), self.buf.shape[1])
            self.buf, self.buf_start = self.buf[:, drop:], self.buf_start + drop
        drop = min(max(0, first - self.buf_start), self.buf.shape[1])
        self.buf, self.buf_start = self.buf[:, drop:], self.buf_start + drop
        return self.buf[:, : max(0, end - first)]  # a view: the buffer is replaced, not changed

    def close(self) -> None:
        self.reader.close()


def babillage_words(transcript: Any, alignment: Any, where: str) -> tuple[list[Word], int]:
    """A Babillage answer's words with their times, sorted by start, and how many were
    dropped because they end before they start. A timestamp that is not a pair of finite
    numbers, or that is negative, is refused in one line naming the word."""
    words = transcript if transcript is not None else []
    times = alignment if alignment is not None else []
    if isinstance(words, str):
        words = words.split()
    if not isinstance(words, (list, tuple, np.ndarray)) \
            or not isinstance(times, (list, tuple, np.ndarray)):
        raise ManifestError(f"{where}: answer_transcript and answer_alignment must be lists")
    if len(words) != len(times):
        raise ManifestError(f"{where}: {len(words)} answer words but {len(times)} timestamps")
    out, dropped = [], 0
    for i, (w, t) in enumerate(zip(words, times)):
        pair = list(t) if isinstance(t, (list, tuple, np.ndarray)) else None
        ok = pair is not None and len(pair) == 2 and all(
            isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and math.isfinite(float(x)) and float(x) >= 0 for x in pair)
        if not isinstance(w, str) or not ok:
            raise ManifestError(f"{where}: answer word {i} {str(w)[:40]!r} has the timestamp "
                                f"{str(t)[:60]}, expected [start, end] in seconds, finite "
                                f"and not negative")
        start, end = float(pair[0]), float(pair[1])
        # Empty words stay: as in an alignment file, they cut the previous word short.
        if start < end:
            out.append((w, start, end))
        else:
            dropped += 1
    return sorted(out, key=lambda x: x[1]), dropped
