"""Training manifests: JSON Lines, one sample a line, paths relative to the manifest.

    speechless  {"image": "cat.jpg", "turns": [{"role": "user", "text": "What is it?"},
                                                {"role": "assistant", "text": "A cat."}]}
    speech      {"image": "cat.jpg", "audio": "talk.wav", "alignment": "talk.json"}
    babillage   {"image": "cat.jpg", "babillage": "coco/train-00000.parquet", "sample_id": 7}

A speech sample is moshi-finetune's layout: a stereo WAV (channel 0 the assistant, i.e.
the model's voice, channel 1 the user) and a JSON of the words spoken, with their times
in seconds: {"alignments": [["Hello", [0.50, 0.82], "SPEAKER_MAIN"], ...]}; only the
assistant's words ("SPEAKER_MAIN", or entries without a speaker) go into the text stream.
A Babillage row (Kyutai's spoken COCO / OCR-VQA) is a question and its spoken answer:
the user asks, then the assistant answers.

Everything a line names is checked when the manifest is read (the files exist, the JSON
parses, an alignment has the right shape, a Babillage sample exists and has its answer),
so a bad line fails the run at once with one line saying which: `train.jsonl:12: ...`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MoshivisError

ROLES = ("user", "assistant")
MAIN_SPEAKER = "SPEAKER_MAIN"
"""moshi-finetune's label of the model's own words (its annotate.py writes it)."""
BABILLAGE_COLUMNS = ("question_audio", "question_alignment", "question_transcript",
                     "answer_audio", "answer_alignment", "answer_transcript")


class ManifestError(MoshivisError):
    """A manifest line that cannot be used; the message starts with `file:line:`."""


Word = tuple[str, float, float]
"""(word, start s, end s)"""


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass
class Entry:
    """One line of a manifest, checked."""

    where: str
    """`manifest:line`, for messages."""
    image: Path
    kind: str
    """'speechless', 'speech' or 'babillage'."""
    turns: list[Turn] = field(default_factory=list)
    audio: Path | None = None
    words: list[Word] = field(default_factory=list)
    """The assistant's words (speech)."""
    babillage: Path | None = None
    sample_id: int | None = None
    dropped: int = 0
    """The assistant's words of its alignment that end before they start (left out, and
    reported)."""

    @property
    def speech(self) -> bool:
        return self.kind != "speechless"


def _fail(where: str, message: str) -> ManifestError:
    return ManifestError(f"{where}: {message}")


def _file(base: Path, value: Any, key: str, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"{key!r} must be a path (a string), got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise _fail(where, f"{key} {path}: no such file")
    if not path.is_file():
        raise _fail(where, f"{key} {path}: not a file")
    return path


def read_alignment(path: Path, where: str) -> tuple[list[Word], int]:
    """moshi-finetune's word timestamps: the assistant's words that last, sorted by start
    (moshi-finetune finds a window's words by bisecting the file's order, which assumes it),
    and how many of the assistant's words do not last (end <= start: left out, as
    moshi-finetune leaves them, and reported). A time that is not a finite number is
    refused; a word starting before 0 s stays (no window holds it: reported as dropped)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(where, f"alignment {path}: unreadable ({' '.join(str(e).split())})") from None
    rows = doc.get("alignments") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise _fail(where, f"alignment {path}: expected {{\"alignments\": [[word, [start, end], "
                           f"speaker], ...]}}")
    words, dropped = [], 0
    for i, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) in (2, 3) and isinstance(row[0], str) \
            and isinstance(row[1], list) and len(row[1]) == 2 \
            and all(isinstance(t, (int, float)) and not isinstance(t, bool)
                    and math.isfinite(t) for t in row[1])
        if not ok:
            raise _fail(where, f"alignment {path}: entry {i} is {json.dumps(row)[:80]}, expected "
                               f"[word, [start, end], speaker] with finite times in seconds")
        speaker = row[2] if len(row) == 3 else MAIN_SPEAKER
        start, end = float(row[1][0]), float(row[1][1])
        # An empty word stays (it cuts the previous word short, as in moshi-finetune); the
        # text is kept as written (tokenizing strips it and keeps its newlines).
        if speaker == MAIN_SPEAKER and start < end:
            words.append((row[0], start, end))
        elif speaker == MAIN_SPEAKER:
            dropped += 1
    return sorted(words, key=lambda w: w[1]), dropped


def _turns(value: Any, where: str) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise _fail(where, "'turns' must be a non-empty list of {\"role\", \"text\"}")
    turns = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or t.get("role") not in ROLES \
                or not isinstance(t.get("text"), str):
            raise _fail(where, f"turn {i} must be {{\"role\": \"user\" or \"assistant\", "
                               f"\"text\": \"...\"}}, got {json.dumps(t)[:80]}")
        turns.append(Turn(t["role"], t["text"].strip()))
    if not any(t.role == "assistant" and t.text for t in turns):
        raise _fail(where, "no assistant turn with text (nothing to learn)")
    return turns


class BabillageFiles:
    """Babillage files met so far, read once (through moshivis-eval's reader)."""

    def __init__(self) -> None:
        self.files: dict[Path, Any] = {}

    def get(self, path: Path, where: str):
        if path not in self.files:
            from ..babillage import Babillage, DataError

            try:
                data = Babillage([path], "coco")
            except DataError as e:
                raise _fail(where, str(e)) from None
            names = set(data.columns())
            missing = [c for c in BABILLAGE_COLUMNS if c not in names]
            if missing:
                raise _fail(where, f"babillage {path}: no {', '.join(missing)} column (training "
                                   f"needs the spoken answers: the coco or ocrvqa configuration)")
            self.files[path] = data
        return self.files[path]


def read_manifest(path: str | Path, babillage: BabillageFiles | None = None) -> list[Entry]:
    """Every line of a manifest, checked; an empty one is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"manifest {path}: "
                            + ("not a file" if path.exists() else "no such file"))
    base = path.parent
    babillage = babillage or BabillageFiles()
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {path}: unreadable ({' '.join(str(e).split())})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(where, f"not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict):
            raise _fail(where, f"expected a JSON object, got {type(doc).__name__}")
        entries.append(_entry(doc, base, where, babillage))
    if not entries:
        raise ManifestError(f"manifest {path}: no samples (an empty split)")
    return entries


KINDS = {"turns": "speechless", "audio": "speech", "babillage": "babillage"}


def _entry(doc: dict, base: Path, where: str, babillage: BabillageFiles) -> Entry:
    kinds = [k for k in KINDS if k in doc]
    if len(kinds) != 1:
        raise _fail(where, "a sample has exactly one of 'turns' (speechless), 'audio' (speech) "
                           "or 'babillage'" + (f", got {', '.join(kinds)}" if kinds else ""))
    kind = KINDS[kinds[0]]
    known = {"speechless": {"image", "turns"}, "speech": {"image", "audio", "alignment"},
             "babillage": {"image", "babillage", "sample_id"}}[kind]
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _fail(where, f"unknown key {', '.join(map(repr, unknown))} for a {kind} sample "
                           f"(its keys: {', '.join(sorted(known))})")
    if "image" not in doc:
        raise _fail(where, "no 'image'")
    image = _file(base, doc["image"], "image", where)
    if kind == "speechless":
        return Entry(where, image, kind, turns=_turns(doc["turns"], where))
    if kind == "speech":
        audio = _file(base, doc["audio"], "audio", where)
        if "alignment" not in doc:
            raise _fail(where, "a speech sample needs 'alignment' (the words' timestamps)")
        words, dropped = read_alignment(_file(base, doc["alignment"], "alignment", where), where)
        return Entry(where, image, kind, audio=audio, words=words, dropped=dropped)
    file = _file(base, doc["babillage"], "babillage", where)
    sid = doc.get("sample_id")
    if isinstance(sid, bool) or not isinstance(sid, int):
        raise _fail(where, f"'sample_id' must be an integer, got {sid!r}")
    if babillage.get(file, where).find(sid) is None:
        raise _fail(where, f"babillage {file}: no sample_id {sid}")
    return Entry(where, image, kind, babillage=file, sample_id=sid)
