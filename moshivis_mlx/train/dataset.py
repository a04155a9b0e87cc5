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

CACHE_VERSION = 2
SPEECHLESS_AUDIO = ("zero", "silence")
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
        self._vision = self._mimi = None
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
                codes, words, windows = self._encode_dialogue(e)
                self.audio_path(key).parent.mkdir(parents=True, exist_ok=True)
                save_safetensors_atomic(self.audio_path(key), {"codes": mx.array(codes)},
                                        {"words": json.dumps(words),
                                         "windows": json.dumps(windows),
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
                         ) -> tuple[np.ndarray, list[Word], list[tuple[float, int]]]:
        """Mimi codes [16, T] (assistant's 8 codebooks, then the user's) of each window of
        one dialogue, one after the other; the assistant's words; and each window's start
        (s) and number of frames."""
        rate = self.mimi().sample_rate
        if e.kind == "speech":
            assistant, user = self._read_stereo(e, rate)
            words = e.words
        else:
            assistant, user, words = self._babillage_dialogue(e, rate)
        pcm = np.zeros((2, max(len(assistant), len(user))), dtype=np.float32)
        pcm[0, : len(assistant)] = assistant
        pcm[1, : len(user)] = user
        pieces, windows = [], []
        for start in window_starts(pcm.shape[1] / rate, self.max_seconds):
            codes = self._encode_window(pcm, start, rate)
            pieces.append(codes)
            windows.append((start, codes.shape[1]))
        return np.concatenate(pieces, axis=1), list(words), windows

    def _encode_window(self, pcm: np.ndarray, start: float, rate: int) -> np.ndarray:
        """Mimi codes [16, frames] of the window starting at `start` s, encoded on their own
        as moshi-finetune encodes each sample: no context from the audio before it."""
        mimi = self.mimi()
        first = int(start * rate)
        piece = pcm[:, first: first + int(self.max_seconds * rate)]
        frames = min(self.max_frames, math.ceil(piece.shape[1] / mimi.frame_size))
        x = np.zeros((2, math.ceil(piece.shape[1] / mimi.frame_size) * mimi.frame_size),
                     dtype=np.float32)
        x[:, : piece.shape[1]] = piece
        channels = [np.asarray(mimi.encode(x[c]))[:, :frames] for c in range(2)]
        return np.concatenate(channels, axis=0).astype(np.int32)

    def _read_stereo(self, e: Entry, rate: int) -> tuple[np.ndarray, np.ndarray]:
        from ..errors import AudioFileError
        from ..resample import resample
        from ..wav import read_wav

        try:
            pcm, sr = read_wav(e.audio)
        except AudioFileError as err:
            raise ManifestError(f"{e.where}: {err}") from None
        if pcm.shape[1] != 2:
            raise ManifestError(f"{e.where}: audio {e.audio}: {pcm.shape[1]} channel(s); a speech "
                                f"sample is a stereo WAV (channel 0 the assistant, 1 the user)")
        return resample(pcm[:, 0], sr, rate), resample(pcm[:, 1], sr, rate)

    def _babillage_dialogue(self, e: Entry, rate: int):
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
        words = data.cell(sample, "answer_transcript") or []
        times = data.cell(sample, "answer_alignment") or []
        if isinstance(words, str):
            words = words.split()
        if len(words) != len(times):
            raise ManifestError(f"{e.where}: {name}: {len(words)} answer words but "
                                f"{len(times)} timestamps")
        offset = len(q) / rate
        # Empty words stay: as in an alignment file, they cut the previous word short.
        aligned = sorted(((str(w), float(s) + offset, float(t) + offset)
                          for w, (s, t) in zip(words, times) if s < t), key=lambda w: w[1])
        user = np.concatenate([q, np.zeros(len(a), dtype=np.float32)])
        assistant = np.concatenate([np.zeros(len(q), dtype=np.float32), a])
        return assistant, user, aligned

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
            mimi = self.mimi()
            codes = mimi.encode(np.zeros(frames * mimi.frame_size, dtype=np.float32))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(path, {"codes": mx.array(np.asarray(codes, np.int32))})
        return np.asarray(mx.load(str(path))["codes"])

    def _speech_samples(self, e: Entry, image: str) -> list[Sample]:
        """One sample per window of the dialogue."""
        path = self.audio_path(self.audio_key(e))
        arrays, meta = mx.load(str(path), return_metadata=True)
        codes_audio = np.asarray(arrays["codes"])
        words = [tuple(w) for w in json.loads(meta["words"])]
        windows = json.loads(meta["windows"])
        rate = float(meta["frame_rate"])
        out, first = [], 0
        for k, (start, frames) in enumerate(windows):
            codes = self._window_codes(codes_audio[:, first: first + frames],
                                       window_words(words, start, self.max_seconds), rate)
            first += frames
            where = e.where if len(windows) == 1 else f"{e.where} (part {k + 1})"
            out.append(Sample(codes, image, True, where))
        return out

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
