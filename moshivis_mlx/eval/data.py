"""The references a Babillage task is scored against, and the benchmark's images.

The references are the benchmarks' own annotation files: COCO captions
(captions_val2014.json, or Karpathy's dataset_coco.json) keyed by image id; VQAv2's
v2_mscoco_val2014_annotations.json keyed by question id (= Babillage's sample_id), which
also gives the image; for OCR-VQA a file of answers by sample id (JSON or JSON Lines), or
else Babillage's own answer transcript.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..babillage import Babillage, DataError, Sample
from ..errors import ImageError
from ..paths import check_readable_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


# -- references ------------------------------------------------------------------------------

def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"annotation file {path} does not exist", f"give {what} with --annotations")
    if path.is_dir():
        raise DataError(f"annotation file {path} is a directory", f"give {what}")
    check_readable_file(path, what, DataError)  # a pipe would block
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: line {line}, column {column}: not UTF-8 text",
                        f"give {what}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: nested too deep to be {what}") from None
    except json.JSONDecodeError as first:
        whole = first
    records = []
    for n, line in enumerate(text.splitlines(), 1):  # JSON Lines
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except RecursionError:
            raise DataError(f"{path}: line {n}: nested too deep to be {what}") from None
        except json.JSONDecodeError as e:
            if not records:  # not JSON Lines either: the whole document's error
                raise DataError(f"{path}: line {whole.lineno}, column {whole.colno}: neither "
                                f"JSON nor JSON Lines ({whole.msg})") from None
            raise DataError(f"{path}: line {n}, column {e.colno}: broken JSON Lines record "
                            f"({e.msg})") from None
    return records


def _id(value: Any, path: str | Path, where: str) -> int:
    """An id in an annotation file (an integer, or a string of digits), or a one-line
    DataError naming the file and where the value is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise DataError(f"{path}: {where}: {value!r:.40} is not an integer id")


def _text(value: Any, path: str | Path, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: {value!r:.40} is not a text")
    return value


COCO_WHAT = "COCO captions (captions_val2014.json or Karpathy's dataset_coco.json)"
VQA_WHAT = "VQAv2 annotations (v2_mscoco_val2014_annotations.json)"
OCR_WHAT = "OCR-VQA answers by sample id (JSON {sample_id: answer} or JSON Lines)"


@dataclass
class References:
    """What each sample is scored against, and where its image is."""

    answers: dict[int, list[str]]
    """sample id -> reference captions or answers."""
    image_of: dict[int, int | str] = field(default_factory=dict)
    """sample id -> image id, where the dataset has none (VQAv2)."""
    file_names: dict[int | str, str] = field(default_factory=dict)
    """image id -> file name, where the annotations give one (COCO)."""
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)
    """sample id -> fields kept in the prediction record (VQAv2's answer_type)."""


def coco_references(path: str | Path, samples: list[Sample]) -> References:
    data = _read_json(path, COCO_WHAT)
    captions: dict[int, list[str]] = {}
    names: dict[int | str, str] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for k, a in enumerate(data["annotations"]):
            where = f"annotations[{k}]"
            if not isinstance(a, dict) or "caption" not in a or "image_id" not in a:
                raise DataError(f"{path}: {where}: not {COCO_WHAT} (an annotation without "
                                f"caption)")
            captions.setdefault(_id(a["image_id"], path, f"{where}.image_id"), []).append(
                _text(a["caption"], path, f"{where}.caption"))
        images = data.get("images", [])
        for k, im in enumerate(images if isinstance(images, list) else []):
            if isinstance(im, dict) and "id" in im and "file_name" in im:
                names[_id(im["id"], path, f"images[{k}].id")] = _text(
                    im["file_name"], path, f"images[{k}].file_name")
    elif isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
            and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        for k, im in enumerate(data["images"]):
            where = f"images[{k}]"
            if not isinstance(im, dict) or not isinstance(im.get("sentences"), list):
                raise DataError(f"{path}: {where}: not {COCO_WHAT} (an image without sentences)")
            image_id = _id(im.get("cocoid", im.get("imgid")), path, f"{where}.cocoid")
            captions[image_id] = [_sentence(x, path, f"{where}.sentences[{j}]")
                                  for j, x in enumerate(im["sentences"])]
            if im.get("filename"):
                names[image_id] = _text(im["filename"], path, f"{where}.filename")
    else:
        raise DataError(f"{path}: not {COCO_WHAT}")
    answers = {}
    for s in samples:
        if s.image_id not in captions:
            raise DataError(f"{path}: no captions for image {s.image_id} (sample {s.sample_id})",
                            "give the captions of the split the questions come from")
        answers[s.sample_id] = captions[s.image_id]
    return References(answers, file_names=names)


def _sentence(x: Any, path: str | Path, where: str) -> str:
    """A Karpathy sentence: its raw text, or its tokens joined."""
    if isinstance(x, dict) and isinstance(x.get("raw"), str) and x["raw"]:
        return x["raw"]
    tokens = x.get("tokens") if isinstance(x, dict) else None
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    raise DataError(f"{path}: {where}: neither raw text nor a list of tokens")


def vqa_references(path: str | Path, samples: list[Sample]) -> References:
    data = _read_json(path, VQA_WHAT)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or (anns and not {"question_id", "answers", "image_id"}
                                      <= set(anns[0])):
        raise DataError(f"{path}: not {VQA_WHAT}")
    by_q = {}
    for k, a in enumerate(anns):
        where = f"annotations[{k}]"
        if not isinstance(a, dict) or not isinstance(a.get("answers"), list):
            raise DataError(f"{path}: {where}: not {VQA_WHAT} (no list of answers)")
        by_q[_id(a.get("question_id"), path, f"{where}.question_id")] = (k, a)
    refs = References({})
    missing = [s.sample_id for s in samples if s.sample_id not in by_q]
    if missing:
        raise DataError(f"{path}: no annotation for {len(missing)} question(s), e.g. sample "
                        f"{missing[0]} (Babillage's sample_id is VQAv2's question_id)",
                        "give the annotations of the split the questions come from")
    for s in samples:
        k, a = by_q[s.sample_id]
        where = f"annotations[{k}]"
        refs.answers[s.sample_id] = [
            _text(x.get("answer") if isinstance(x, dict) else x, path,
                  f"{where}.answers[{j}].answer") for j, x in enumerate(a["answers"])]
        refs.image_of[s.sample_id] = _id(a.get("image_id"), path, f"{where}.image_id")
        refs.extra[s.sample_id] = {k: a[k] for k in ("answer_type", "question_type") if k in a}
    return refs


def ocrvqa_references(path: str | Path | None, samples: list[Sample],
                      dataset: Babillage) -> References:
    if path is None:
        spoken = dataset.answer_transcripts()
        return References({s.sample_id: [spoken[s.sample_id]] for s in samples})
    data = _read_json(path, OCR_WHAT)
    if isinstance(data, dict) and "sample_id" in data:
        data = [data]  # JSON Lines of one record
    table: dict[int, list[str]] = {}
    rows = data.items() if isinstance(data, dict) else None
    if rows is None and isinstance(data, list):
        rows = []
        for n, r in enumerate(data, 1):
            if not isinstance(r, dict) or "sample_id" not in r:
                raise DataError(f"{path}: record {n}: not {OCR_WHAT}")
            rows.append((r["sample_id"], r.get("answers", r.get("answer"))))
    if rows is None:
        raise DataError(f"{path}: not {OCR_WHAT}")
    for k, v in rows:
        key = _id(k, path, "sample_id")
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            table[key] = v
        else:
            table[key] = [_text(v, path, f"the answer of sample {key}")]
    missing = [s.sample_id for s in samples if s.sample_id not in table]
    if missing:
        raise DataError(f"{path}: no answer for {len(missing)} sample(s), e.g. {missing[0]}")
    return References({s.sample_id: table[s.sample_id] for s in samples})


def load_references(task: str, annotations: str | Path | None, samples: list[Sample],
                    dataset: Babillage) -> References:
    if task == "ocrvqa":
        return ocrvqa_references(annotations, samples, dataset)
    if annotations is None:
        what = COCO_WHAT if task == "coco" else VQA_WHAT
        raise DataError(f"--task {task} needs --annotations: {what}")
    if task == "coco":
        return coco_references(annotations, samples)
    return vqa_references(annotations, samples)


# -- images ----------------------------------------------------------------------------------

TRAILING_NUMBER = re.compile(r"(\d+)$")


class ImageFolder:
    """Finds a benchmark image by id: the annotations' file name, or a file whose name is
    the id or ends in it (COCO_val2014_000000391895.jpg, 391895.jpg, 0001234567.jpg)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise ImageError(f"image folder {self.root} {what}",
                             "give the benchmark's images with --images")
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, Path] = {}
        self.by_number: dict[int, Path] = {}
        for folder in [self.root, *sorted(p for p in self.root.iterdir() if p.is_dir())]:
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                    continue
                self.by_name.setdefault(p.name, p)
                self.by_stem.setdefault(p.stem, p)
                m = TRAILING_NUMBER.search(p.stem)
                if m:
                    self.by_number.setdefault(int(m.group(1)), p)

    def find(self, image_id: int | str, file_name: str | None = None) -> Path | None:
        if file_name:
            name = Path(file_name).name
            if name in self.by_name:
                return self.by_name[name]
        if str(image_id) in self.by_stem:
            return self.by_stem[str(image_id)]
        try:
            return self.by_number.get(int(image_id))
        except (TypeError, ValueError):
            return None

    def path(self, image_id: int | str, file_name: str | None = None,
             sample_id: int | None = None) -> Path:
        p = self.find(image_id, file_name)
        if p is None:
            looked = f"{file_name} or " if file_name else ""
            of = f" (sample {sample_id})" if sample_id is not None else ""
            raise ImageError(f"image {image_id}{of} not found in {self.root}: looked for "
                             f"{looked}a file named {image_id}.* or ending in its number",
                             "give the benchmark's image folder with --images")
        return p
