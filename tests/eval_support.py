"""A small benchmark in Babillage's format for the moshivis-eval tests: parquet files with
spoken questions (espeak-ng, sox), small images, and references in the official COCO
captions and VQAv2 annotation formats."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COCO_QUESTIONS = [
    # (sample_id, image_id, question)
    (101, 42, "Can you describe this picture?"),
    (102, 42, "What do you see here?"),
    (103, 7, "Tell me what is in the image."),
    (104, 7, "Describe the photo please."),
    (105, 19, "What is this a picture of?"),
]
COCO_CAPTIONS = {
    42: ["A red house under a blue sky.", "A small house with a red roof.",
         "A drawing of a house and a tree.", "A house next to a green hill.",
         "The sun shines over a little house."],
    7: ["A grey picture of a house.", "A black and white drawing of a home.",
        "A house seen in grey tones.", "A simple sketch of a building.",
        "A monochrome picture of a house and a tree."],
    19: ["A blue square.", "A plain blue picture.", "Nothing but blue.",
         "A blue background.", "An empty blue image."],
}
VQA_QUESTIONS = [
    (5001, None, "How many windows are there?"),
    (5002, None, "What colour is the roof?"),
    (5003, None, "Is it sunny?"),
]
VQA_ANNOTATIONS = {
    5001: (42, ["2", "2", "2", "two", "3", "2", "2", "4", "2", "2"]),
    5002: (42, ["red"] * 10),
    5003: (7, ["yes", "yes", "no", "yes", "yes", "yes", "yes", "yes", "yes", "yes"]),
}


@dataclass
class Benchmark:
    data: Path
    images: Path
    annotations: Path


def speech_bytes(tmp: Path, text: str, rate: int = 16000) -> bytes:
    """A WAV file of `text` spoken by espeak-ng, at `rate` (sox)."""
    raw, out = tmp / "raw.wav", tmp / "q.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(out)],
                   check=True, capture_output=True)
    data = out.read_bytes()
    raw.unlink()
    out.unlink()
    return data


def tone_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A short WAV (no espeak-ng needed), through soundfile."""
    import io

    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate,
                    format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_parquet(path: Path, task: str, rows: list[tuple[int, int | None, str]],
                  audio: list[bytes], row_group_size: int = 2) -> Path:
    """Babillage's schema: ids, question audio ({bytes, path}), transcript, alignment, and
    for coco / ocrvqa the answer columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    words = [q.split() for _, _, q in rows]
    columns = {"sample_id": pa.array([r[0] for r in rows], pa.int64())}
    if task != "vqav2":
        columns["image_id"] = pa.array([r[1] for r in rows], pa.int64())
    columns["question_audio"] = pa.array(
        [{"bytes": a, "path": f"{r[0]}.wav"} for r, a in zip(rows, audio)], audio_type)
    columns["question_transcript"] = pa.array(words, pa.list_(pa.string()))
    columns["question_alignment"] = pa.array(
        [[[0.3 * i, 0.3 * i + 0.25] for i in range(len(w))] for w in words],
        pa.list_(pa.list_(pa.float64())))
    if task != "vqav2":
        answers = [["It", "is", "a", "house."] for _ in rows]
        columns["answer_audio"] = pa.array([{"bytes": b"", "path": ""} for _ in rows],
                                           audio_type)
        columns["answer_transcript"] = pa.array(answers, pa.list_(pa.string()))
        columns["answer_alignment"] = pa.array([[[0.0, 0.2]] * 4 for _ in rows],
                                               pa.list_(pa.list_(pa.float64())))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_images(folder: Path, ids: list[int]) -> Path:
    """COCO-named pictures: the sample drawing, its grey mirror, a plain blue square."""
    from PIL import Image

    from moshivis_mlx.app.demo import SAMPLE_IMAGE

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(SAMPLE_IMAGE).convert("RGB").resize((64, 48))
    variants = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L"),
                Image.new("RGB", (40, 40), (30, 60, 200))]
    for k, image_id in enumerate(ids):
        variants[k % len(variants)].save(folder / f"COCO_val2014_{image_id:012d}.jpg")
    return folder


def coco_annotations(path: Path) -> Path:
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in COCO_CAPTIONS]
    anns = [{"image_id": i, "id": 1000 * i + k, "caption": c}
            for i, caps in COCO_CAPTIONS.items() for k, c in enumerate(caps)]
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def vqa_annotations(path: Path) -> Path:
    anns = [{"question_id": q, "image_id": image, "question_type": "what",
             "answer_type": "number" if q == 5001 else "other",
             "multiple_choice_answer": answers[0],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                         for k, a in enumerate(answers)]}
            for q, (image, answers) in VQA_ANNOTATIONS.items()]
    path.write_text(json.dumps({"info": {}, "data_subtype": "val2014", "annotations": anns}))
    return path


def make_benchmark(root: Path, task: str = "coco", spoken: bool = True) -> Benchmark:
    """Babillage's layout: root/<task>/<split>-00000-of-00001.parquet, images, references."""
    rows = COCO_QUESTIONS if task != "vqav2" else VQA_QUESTIONS
    split = "validation" if task == "vqav2" else "test"
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    audio = [speech_bytes(tmp, q) if spoken else tone_bytes() for _, _, q in rows]
    write_parquet(root / "Babillage" / task / f"{split}-00000-of-00001.parquet", task, rows,
                  audio)
    images = write_images(root / "images", sorted(COCO_CAPTIONS))
    ann = (coco_annotations(root / "captions.json") if task != "vqav2"
           else vqa_annotations(root / "vqa.json"))
    return Benchmark(root / "Babillage", images, ann)
