"""Babillage's files, the references and the images, and the one-line errors of
moshivis-eval for what a user can get wrong (no model is loaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_support import (
    COCO_QUESTIONS,
    VQA_QUESTIONS,
    coco_annotations,
    tone_bytes,
    vqa_annotations,
    write_images,
    write_parquet,
)

from moshivis_mlx.babillage import Babillage, DataError, parquet_files
from moshivis_mlx.errors import EXIT_IMAGE, EXIT_USAGE, EXIT_WEIGHTS, ImageError
from moshivis_mlx.eval.data import ImageFolder, coco_references, load_references, vqa_references
from moshivis_mlx.eval.report import read_predictions


@pytest.fixture
def coco(tmp_path):
    path = write_parquet(tmp_path / "Babillage" / "coco" / "test-00000-of-00001.parquet", "coco",
                         COCO_QUESTIONS, [tone_bytes(0.3 + 0.1 * i) for i in range(5)])
    return path


def test_reads_babillage(coco, tmp_path):
    files = parquet_files(tmp_path / "Babillage", "coco")
    assert files == [coco]
    ds = Babillage(files, "coco")
    assert [s.sample_id for s in ds.samples] == [q[0] for q in COCO_QUESTIONS]
    assert [s.index for s in ds.samples] == list(range(5))
    assert ds.samples[0].question == "Can you describe this picture?"
    assert ds.samples[2].image_id == 7
    # Audio from the row group that holds it (two rows a group here), decoded.
    for i in (4, 0, 3):
        pcm, rate = ds.question_audio(ds.samples[i])
        assert rate == 16000 and pcm.dtype == np.float32
        assert len(pcm) == int((0.3 + 0.1 * i) * 16000)
    assert ds.answer_transcripts()[101] == "It is a house."


def test_split_and_folder_resolution(coco, tmp_path):
    assert parquet_files(coco, "coco") == [coco]
    assert parquet_files(tmp_path / "Babillage" / "coco", "coco", "test") == [coco]
    with pytest.raises(DataError, match="no validation files .*found test.*--split"):
        parquet_files(tmp_path / "Babillage", "coco", "validation")
    with pytest.raises(DataError, match="no such file"):
        parquet_files(tmp_path / "nowhere", "coco")


def test_another_schema_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["hello"]}), path)
    with pytest.raises(DataError, match="not Babillage's coco schema: no column sample_id, "
                                        "question_audio.*its columns: id, text"):
        Babillage([path], "coco")
    # VQAv2 rows have no image id; a coco file read as vqav2 is fine, the reverse is not.
    vqa = write_parquet(tmp_path / "vqa.parquet", "vqav2", VQA_QUESTIONS, [tone_bytes()] * 3)
    with pytest.raises(DataError, match="no column image_id"):
        Babillage([vqa], "coco")


def retyped(tmp_path, column: str, values: list, task: str = "coco"):
    """A Babillage file of `task` whose `column` holds `values` (one per question)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = VQA_QUESTIONS if task == "vqav2" else COCO_QUESTIONS
    good = write_parquet(tmp_path / "good.parquet", task, questions,
                         [tone_bytes()] * len(questions))
    table = pq.read_table(good)
    table = table.set_column(table.schema.get_field_index(column), column,
                             pa.array(values[:len(questions)]))
    path = tmp_path / f"bad-{column}.parquet"
    pq.write_table(table, path, row_group_size=2)
    return path


@pytest.mark.parametrize("column,values,expected", [
    ("sample_id", ["q101", "q102", "q103", "q104", "q105"],
     "column sample_id, row 0: 'q101' is not an integer"),
    ("sample_id", ["101", "102", "103", "104", "10 5"],
     "column sample_id, row 4: '10 5' is not an integer"),  # the second row group
    ("sample_id", [101, 102, None, 104, 105], "column sample_id, row 2: None is not an integer"),
    ("sample_id", [1.5, 2.0, 3.0, 4.0, 5.0], "column sample_id holds double, expected integers"),
    ("sample_id", [[1], [2], [3], [4], [5]], "column sample_id holds list<"),
    ("image_id", [4.2, 4.2, 7.0, 7.0, 1.9], "column image_id holds double, expected integers "
                                             "or strings"),
    ("question_transcript", [1, 2, 3, 4, 5], "column question_transcript holds int64, expected "
                                             "a list of words"),
    ("question_transcript", [[1.0]] * 5, "column question_transcript holds list<"),
    ("answer_transcript", [7] * 5, "column answer_transcript holds int64, expected a list"),
])
def test_a_column_of_the_wrong_type_is_one_line(tmp_path, column, values, expected):
    """Each names the file and the column (and the row, for a value): a DataError, which
    the command line prints as one line."""
    path = retyped(tmp_path, column, values)
    with pytest.raises(DataError) as e:
        Babillage([path], "coco")
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message


def test_sample_ids_as_strings_of_digits_are_read(tmp_path):
    path = retyped(tmp_path, "sample_id", ["101", "102", "103", "104", " 105"])
    ds = Babillage([path], "coco")
    assert [s.sample_id for s in ds.samples] == [101, 102, 103, 104, 105]
    assert ds.answer_transcripts()[105] == "It is a house."


def test_audio_as_array(tmp_path):
    from moshivis_mlx.babillage import decode_audio

    pcm, rate = decode_audio({"array": [0.0, 0.5, -0.5], "sampling_rate": 8000}, "x")
    assert rate == 8000 and pcm.tolist() == [0.0, 0.5, -0.5]
    with pytest.raises(DataError, match="cannot decode the audio"):
        decode_audio({"bytes": b"not audio at all", "path": "x.wav"}, "x")


def test_references(coco, tmp_path):
    ds = Babillage([coco], "coco")
    refs = coco_references(coco_annotations(tmp_path / "c.json"), ds.samples)
    assert len(refs.answers[101]) == 5 and refs.answers[101] == refs.answers[102]
    assert refs.file_names[42] == "COCO_val2014_000000000042.jpg"
    karpathy = {"images": [{"cocoid": i, "filename": f"COCO_val2014_{i:012d}.jpg",
                            "sentences": [{"raw": "A house.", "tokens": ["a", "house"]}]}
                           for i in (42, 7, 19)]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert coco_references(tmp_path / "k.json", ds.samples).answers[103] == ["A house."]
    with pytest.raises(DataError, match="annotation file .*missing.json does not exist"):
        load_references("coco", tmp_path / "missing.json", ds.samples, ds)
    with pytest.raises(DataError, match="needs --annotations"):
        load_references("coco", None, ds.samples, ds)
    (tmp_path / "bad.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="not COCO captions"):
        coco_references(tmp_path / "bad.json", ds.samples)
    # OCR-VQA: Babillage's own answers, or a file of answers by sample id
    assert load_references("ocrvqa", None, ds.samples, ds).answers[105] == ["It is a house."]
    (tmp_path / "ocr.jsonl").write_text("".join(json.dumps({"sample_id": q[0], "answer": "Dune"})
                                                + "\n" for q in COCO_QUESTIONS))
    assert load_references("ocrvqa", tmp_path / "ocr.jsonl", ds.samples, ds).answers[104] \
        == ["Dune"]


def test_vqa_references(tmp_path):
    vqa = write_parquet(tmp_path / "vqa.parquet", "vqav2", VQA_QUESTIONS, [tone_bytes()] * 3)
    ds = Babillage([vqa], "vqav2")
    refs = vqa_references(vqa_annotations(tmp_path / "a.json"), ds.samples)
    assert refs.image_of == {5001: 42, 5002: 42, 5003: 7}
    assert len(refs.answers[5001]) == 10 and refs.extra[5001]["answer_type"] == "number"
    (tmp_path / "few.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="no annotation for 3 question"):
        vqa_references(tmp_path / "few.json", ds.samples)


def test_image_folder(tmp_path):
    folder = ImageFolder(write_images(tmp_path / "images", [42, 7]))
    assert folder.path(42).name == "COCO_val2014_000000000042.jpg"
    assert folder.path(7, "COCO_val2014_000000000007.jpg").name.endswith("7.jpg")
    with pytest.raises(ImageError, match="image 19 .sample 105. not found in"):
        folder.path(19, sample_id=105)
    with pytest.raises(ImageError, match="does not exist"):
        ImageFolder(tmp_path / "none")


def test_a_cut_short_line_is_dropped(tmp_path):
    path = tmp_path / "p.jsonl"
    one, two = (json.dumps({"sample_id": i, "index": i, "prediction": "A house.",
                            "references": ["a house"]}) for i in (1, 2))
    path.write_text(f'{one}\n{two}\n{{"sample_')
    assert [r["sample_id"] for r in read_predictions(path)] == [1, 2]
    assert path.read_text() == f"{one}\n{two}\n"
    path.write_text(f"{one}\nbroken\n{two}\n")
    with pytest.raises(Exception, match="line 2, column 1: broken record"):
        read_predictions(path)


# -- the command line's one-line errors (before any model is loaded) ---------------------------

def run_cli(*args):
    from moshivis_mlx.cli.eval import main

    return main([str(a) for a in args])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moshivis-eval: error: "), err
    return err[0]


def test_cli_errors(coco, tmp_path, capsys):
    images = write_images(tmp_path / "images", [42, 7])  # 19 is missing
    ann = coco_annotations(tmp_path / "c.json")
    base = ["--data", tmp_path / "Babillage", "--images", images, "--weights", tmp_path / "w",
            "--out", tmp_path / "out"]
    assert run_cli("--task", "cocoa", *base) == EXIT_USAGE
    assert "unknown task 'cocoa' (choose coco, vqav2, ocrvqa)" in _one_line(capsys)
    assert run_cli("--task", "coco", *base, "--annotations", tmp_path / "nope.json") == 1
    assert "annotation file" in _one_line(capsys)
    assert run_cli("--task", "coco", *base, "--annotations", ann) == EXIT_IMAGE
    assert "image 19 (sample 105) not found" in _one_line(capsys)
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": [1]}), other)
    assert run_cli("--task", "coco", "--data", other, *base[2:], "--annotations", ann) == 1
    assert "not Babillage's coco schema" in _one_line(capsys)
    named = retyped(tmp_path, "sample_id", ["q1", "q2", "q3", "q4", "q5"])
    assert run_cli("--task", "coco", "--data", named, *base[2:], "--annotations", ann) == 1
    line = _one_line(capsys)
    assert f"{named}: column sample_id, row 0: 'q1' is not an integer" in line
    assert "internal error" not in line
    assert run_cli("--task", "coco", *base, "--annotations", ann, "--shard", "2/2") == EXIT_USAGE
    assert "--shard 2/2" in _one_line(capsys)
    assert run_cli("--task", "coco", *base, "--annotations", ann, "--adapters", tmp_path) \
        == EXIT_WEIGHTS
    assert "no adapter_config.json" in _one_line(capsys)
