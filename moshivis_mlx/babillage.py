"""Kyutai's Babillage: the spoken questions of COCO captions, VQAv2 and OCR-VQA, read
by the evaluation and by training alike.

Babillage (huggingface.co/datasets/kyutai/Babillage) is parquet, one configuration per
benchmark (`coco`, `ocrvqa`: validation and test splits; `vqav2`: validation), files named
`<config>/<split>-00000-of-000NN.parquet`. Each row is one spoken question:

    sample_id            int64
    image_id             int64     (coco, ocrvqa; VQAv2's image comes from its annotations)
    question_audio       audio     Hugging Face's audio feature: a struct {bytes, path}
                                   holding an encoded file (WAV, FLAC, MP3, OGG), or
                                   {array, sampling_rate}
    question_transcript  list<string>          the words of the question
    question_alignment   list<list<float64>>   [start, end] seconds of each word
    answer_audio, answer_transcript, answer_alignment    the spoken answer (coco, ocrvqa)

Only the question columns (and the ids) are read. The metadata of every row is read up
front (a few MB); the audio is read one row group at a time when a sample needs it. A
column of another type (COLUMN_TYPES), or a sample id that is no integer, is refused in
one line naming the file and the column.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoshivisError, one_line
from .wav import MAX_RATE, MIN_RATE

TASKS = ("coco", "vqav2", "ocrvqa")
DEFAULT_SPLIT = {"coco": "test", "ocrvqa": "test", "vqav2": "validation"}
SPLITS = ("train", "validation", "test")

QUESTION_COLUMNS = ("sample_id", "question_audio", "question_transcript", "question_alignment")


class DataError(MoshivisError):
    """A dataset, annotation or image folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One spoken question of the benchmark."""

    index: int
    """Position in the dataset (file order): the order of the predictions."""
    sample_id: int
    image_id: int | str | None
    question: str
    """The question's words (the transcript), joined by spaces."""
    source: tuple[int, int, int] = field(repr=False, compare=False, default=(0, 0, 0))
    """(file, row group, row in the group) of its audio."""


def _required(task: str) -> tuple[str, ...]:
    return QUESTION_COLUMNS + (() if task == "vqav2" else ("image_id",))


def parquet_files(data: str | Path, task: str, split: str | None = None) -> list[Path]:
    """The parquet files of `task`'s `split` under `data` (a file, a Babillage checkout, or
    a folder of parquet files)."""
    path = Path(data).expanduser()
    split = split or DEFAULT_SPLIT[task]
    if not path.exists():
        raise DataError(f"{path}: no such file or directory",
                        "give a Babillage parquet file or folder with --data")
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"{path}: not a parquet file")
        return [path]
    if (path / task).is_dir():
        path = path / task
    found = sorted(path.glob("*.parquet"))
    if not found:
        raise DataError(f"{path}: no parquet files (expected Babillage's "
                        f"{task}/{split}-*.parquet)")
    named = [f for f in found if f.name.startswith(split)]
    if named:
        return named
    others = sorted({s for f in found for s in SPLITS if f.name.startswith(s)})
    if others:
        raise DataError(f"{path}: no {split} files (found {', '.join(others)}); choose one "
                        f"with --split")
    return found


def _is_id(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_words(t: Any) -> bool:
    """A transcript: a list of words, or one string."""
    import pyarrow as pa

    text = pa.types.is_string(t) or pa.types.is_large_string(t)
    listed = pa.types.is_list(t) or pa.types.is_large_list(t)
    return text or (listed and (pa.types.is_string(t.value_type)
                                or pa.types.is_large_string(t.value_type)))


COLUMN_TYPES = {
    "sample_id": (_is_id, "integers"),
    "image_id": (_is_id, "integers or strings"),
    "question_transcript": (_is_words, "a list of words (strings)"),
    "answer_transcript": (_is_words, "a list of words (strings)"),
}
"""The columns read besides the audio, and what they must hold: anything else is refused
before a row is read, naming the file and the column."""


def _check_types(path: Path, schema: Any) -> None:
    for name, (ok, what) in COLUMN_TYPES.items():
        if name in schema.names and not ok(schema.field(name).type):
            raise DataError(f"{path}: column {name} holds {schema.field(name).type}, "
                            f"expected {what}", "give Babillage's parquet files")


def as_id(value: Any, path: Path, column: str, row: int) -> int:
    """A sample id cell as an integer (a string of digits too), or a one-line DataError
    naming the file, the column and the row."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise DataError(f"{path}: column {column}, row {row}: {value!r} is not an integer",
                    "give Babillage's parquet files")


def _check_schema(path: Path, schema: Any, task: str) -> None:
    names = set(schema.names)
    missing = [c for c in _required(task) if c not in names]
    if missing:
        raise DataError(
            f"{path}: not Babillage's {task} schema: no column {', '.join(missing)} "
            f"(its columns: {', '.join(schema.names)[:200]})",
            "give the parquet files of the task's configuration")
    _check_types(path, schema)
    import pyarrow as pa

    audio = schema.field("question_audio").type
    ok = pa.types.is_struct(audio) and (
        {"bytes"} <= {f.name for f in audio} or {"array"} <= {f.name for f in audio})
    if not (ok or pa.types.is_binary(audio) or pa.types.is_large_binary(audio)):
        raise DataError(f"{path}: question_audio is {audio}, not an audio struct "
                        f"{{bytes, path}} or {{array, sampling_rate}}")


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MoshivisError("reading Babillage needs pyarrow",
                            "pip install 'moshivis-mlx[eval]'") from None
    return pq


class Babillage:
    """The questions of one task and split, in file order; audio read on demand."""

    def __init__(self, files: list[Path], task: str):
        pq = _pyarrow()
        self.task = task
        self.files = files
        self._readers = []
        self._starts: list[list[int]] = []  # each file's row of each row group's first row
        self.samples: list[Sample] = []
        meta = ["sample_id", "question_transcript"] + ([] if task == "vqav2" else ["image_id"])
        index = 0
        for fi, path in enumerate(files):
            first = 0  # the file's row of the row group's first row
            try:
                reader = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
                raise DataError(f"{path}: not a readable parquet file ({e})") from None
            _check_schema(path, reader.schema_arrow, task)
            self._readers.append(reader)
            self._starts.append([])
            for rg in range(reader.num_row_groups):
                self._starts[-1].append(first)
                table = reader.read_row_group(rg, columns=meta)
                ids = table.column("sample_id").to_pylist()
                words = table.column("question_transcript").to_pylist()
                images = (table.column("image_id").to_pylist() if "image_id" in meta
                          else [None] * len(ids))
                for row, (sid, ws, image) in enumerate(zip(ids, words, images)):
                    text = " ".join(w.strip() for w in (ws or []) if w and w.strip())
                    if isinstance(ws, str):
                        text = ws.strip()
                    sid = as_id(sid, path, "sample_id", first + row)
                    self.samples.append(Sample(index, sid, image, text, (fi, rg, row)))
                    index += 1
                first += len(ids)
        self._groups: OrderedDict[tuple[int, int], list] = OrderedDict()

    def __len__(self) -> int:
        return len(self.samples)

    def columns(self) -> list[str]:
        """The columns every file has."""
        names = [set(r.schema_arrow.names) for r in self._readers]
        return sorted(set.intersection(*names)) if names else []

    def _row_group(self, fi: int, rg: int, column: str) -> list:
        key = (fi, rg, column)
        if key not in self._groups:
            table = self._readers[fi].read_row_group(rg, columns=[column])
            self._groups[key] = table.column(column).to_pylist()
            while len(self._groups) > 2:  # a row group of audio can be ~100 MB
                self._groups.popitem(last=False)
        return self._groups[key]

    def cell(self, sample: Sample, column: str) -> Any:
        """One column's raw value for a sample (read with its row group)."""
        fi, rg, row = sample.source
        return self._row_group(fi, rg, column)[row]

    def find(self, sample_id: int) -> Sample | None:
        """The sample with this id (None: not in these files)."""
        if not hasattr(self, "_by_id"):
            self._by_id = {s.sample_id: s for s in self.samples}
        return self._by_id.get(sample_id)

    def where(self, sample: Sample, column: str) -> str:
        """"FILE: row R, column C (sample ID)": where a cell is, for messages."""
        fi, rg, row = sample.source
        return (f"{self.files[fi]}: row {self._starts[fi][rg] + row}, column {column} "
                f"(sample {sample.sample_id})")

    def question_audio(self, sample: Sample, max_seconds: float | None = None
                       ) -> tuple[np.ndarray, int]:
        """The spoken question: float32 mono samples and their rate (a DataError naming
        the file, the row and the column if the cell cannot be used)."""
        return decode_audio(self.cell(sample, "question_audio"),
                            self.where(sample, "question_audio"), max_seconds)

    def answer_transcripts(self) -> dict[int, str]:
        """Babillage's spoken answers' words by sample id (coco, ocrvqa)."""
        out: dict[int, str] = {}
        for fi, reader in enumerate(self._readers):
            if "answer_transcript" not in reader.schema_arrow.names:
                raise DataError(f"{self.files[fi]}: no answer_transcript column",
                                "give the answers with --annotations")
            table = reader.read(columns=["sample_id", "answer_transcript"])
            for row, (sid, ws) in enumerate(zip(table.column("sample_id").to_pylist(),
                                                table.column("answer_transcript").to_pylist())):
                sid = as_id(sid, self.files[fi], "sample_id", row)
                out[sid] = ws.strip() if isinstance(ws, str) else " ".join(
                    w.strip() for w in (ws or []) if w and w.strip())
        return out


def _check_audio(name: str, rate: Any, frames: int, max_seconds: float | None) -> int:
    """The rate and length an audio cell claims, checked before it is decoded or
    resampled: a rate recorders make (the WAV reader's 1 kHz to 768 kHz), some samples,
    and at most `max_seconds` of them. Returns the rate."""
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool):
        raise DataError(f"{name}: sampling_rate {rate!r} is not a number of Hz")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DataError(f"{name}: a sample rate of {rate} Hz is not audio (Babillage's reader "
                        f"takes {MIN_RATE} Hz to {MAX_RATE // 1000} kHz)")
    if frames <= 0:
        raise DataError(f"{name}: the audio is empty (0 samples)")
    if max_seconds is not None and frames > max_seconds * rate:
        raise DataError(f"{name}: the audio lasts {frames / rate:.0f} s, longer than the "
                        f"{max_seconds:g} s allowed")
    return int(rate)


def decode_audio(value: Any, name: str, max_seconds: float | None = None
                 ) -> tuple[np.ndarray, int]:
    """A Hugging Face audio cell -> (float32 mono samples, sample rate). Any cell that
    cannot be used (empty, undecodable, a rate that is not audio, longer than
    `max_seconds`, samples that are not finite) is a one-line DataError starting with
    `name`; the length is checked before anything is decoded."""
    if isinstance(value, dict) and value.get("array") is not None:
        rate = value.get("sampling_rate", value.get("sample_rate"))
        if rate is None:
            raise DataError(f"{name}: audio array without its sampling_rate")
        try:
            a = np.asarray(value["array"], dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise DataError(f"{name}: the audio array is not numbers ({one_line(e, 100)})"
                            ) from None
        a = a.mean(axis=-1) if a.ndim > 1 else a.reshape(-1)
        rate = _check_audio(name, rate, len(a), max_seconds)
    else:
        raw = value.get("bytes") if isinstance(value, dict) else value
        if not raw:
            where = value.get("path") if isinstance(value, dict) else None
            raise DataError(f"{name}: the audio cell holds no bytes"
                            + (f" (only a path, {where})" if where else ""))
        try:
            import soundfile
        except ImportError:
            raise MoshivisError("decoding Babillage's audio needs soundfile",
                                "pip install 'moshivis-mlx[eval]'") from None
        try:
            with soundfile.SoundFile(io.BytesIO(raw)) as f:
                rate = _check_audio(name, f.samplerate, f.frames, max_seconds)
                pcm = f.read(dtype="float32", always_2d=True)
        except DataError:
            raise
        except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, ...
            raise DataError(f"{name}: cannot decode the audio ({one_line(e, 200)})") from None
        a = pcm.mean(axis=1)
        if len(a) == 0:
            raise DataError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(a).all():
        raise DataError(f"{name}: the audio holds NaN or infinite samples")
    return a, rate
