"""moshivis-eval as a hostile user drives it: options that are not numbers or not in range,
data and annotations that are not what they claim, its own files edited by hand, two runs
on one --out, shards of different models merged, audio cells that cannot be used, and the
app's regressions of the same round (a full disk under --record, the lock's advice, a
10000 x 1 PNG). Every bad input is one line naming the option or the file (and the line,
row or column) before the model loads; a sample that cannot be asked is skipped, said,
counted and listed; nothing is lost."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_support import FakeSoundDevice, app_env, demo_bundle, run_main
from eval_support import (
    COCO_QUESTIONS,
    coco_annotations,
    tone_bytes,
    vqa_annotations,
    write_images,
    write_parquet,
)

from moshivis_mlx.babillage import DataError, decode_audio
from moshivis_mlx.errors import EXIT_ERROR, EXIT_USAGE, EXIT_WEIGHTS, MoshivisError
from moshivis_mlx.fileio import output_lock

CONVERSATION = ["--opening-s", "0.2", "--silence-s", "0.3", "--max-answer-s", "1"]


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle()


def run_cli(*args) -> int:
    """moshivis-eval's exit status (argparse's own refusals exit through SystemExit)."""
    from moshivis_mlx.cli.eval import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code)


def refused(capsys, code: int, expected_code: int, *pieces: str) -> str:
    """One line on stderr, the documented exit code, no traceback, nothing loaded."""
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("moshivis-eval: error: ")]
    assert code == expected_code, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "internal error" not in lines[0] and "out of memory" not in lines[0], lines[0]
    assert "loading" not in captured.out, "refused only after the model loaded"
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


class Bench:
    """A tiny COCO benchmark (tone questions: no speech synthesis needed)."""

    def __init__(self, root: Path, audio: list | None = None, questions=COCO_QUESTIONS):
        self.root = root
        self.parquet = write_parquet(root / "Babillage" / "coco" / "test-00000-of-00001.parquet",
                                     "coco", questions,
                                     audio or [tone_bytes(0.3)] * len(questions))
        self.data = root / "Babillage"
        self.images = write_images(root / "images", [42, 7, 19])
        self.annotations = coco_annotations(root / "captions.json")

    def args(self, bundle, out, *extra, annotations=None):
        return ["--task", "coco", "--data", self.data, "--images", self.images,
                "--annotations", annotations or self.annotations, "--weights", bundle,
                "--out", out, *CONVERSATION, *extra]


@pytest.fixture
def bench(tmp_path):
    return Bench(tmp_path)


# -- options: checked before anything is read --------------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--opening-s", "nan"), ("--opening-s", "1e12"), ("--opening-s", "-1"),
    ("--opening-s", "inf"), ("--silence-s", "nan"), ("--silence-s", "0"),
    ("--silence-s", "inf"), ("--silence-s", "-2"), ("--max-answer-s", "inf"),
    ("--max-answer-s", "nan"), ("--max-answer-s", "-1"), ("--max-answer-s", "0"),
    ("--max-answer-s", "1e9"), ("--answer-silence", "nan"), ("--max-answer-seconds", "inf"),
    ("--seed", "-1"), ("--seed", str(1 << 63)),
])
def test_numeric_options_are_finite_and_in_range(tmp_path, capsys, option, value):
    """Refused before the data is even looked at (here it does not exist: the option's
    error comes first), with the option named and the range it takes."""
    code = run_cli("--task", "coco", "--data", tmp_path / "none", "--images", tmp_path,
                   "--weights", tmp_path / "w", "--out", tmp_path / "out", option, value)
    named = {"--silence-s": "--answer-silence", "--max-answer-s": "--max-answer-seconds"}
    refused(capsys, code, EXIT_USAGE, f"{named.get(option, option)} must be in", "got ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "-5"], "--limit must be at least 1"),
    (["--shard", "1/0"], "--shard 1/0"), (["--shard=-1/4"], "--shard -1/4"),
    (["--shard", "a/b"], "--shard 'a/b'"), (["--mode", "video"], "unknown mode"),
    (["--ptb", "perl"], "--ptb"), (["-q", "3"], "-q/--quantize: choose q8"),
])
def test_other_options(tmp_path, capsys, args, expected):
    code = run_cli("--task", "coco", "--data", tmp_path / "none", "--images", tmp_path,
                   "--weights", tmp_path / "w", "--out", tmp_path / "out", *args)
    refused(capsys, code, EXIT_USAGE, expected)


def test_a_shard_without_images(bench, bundle, tmp_path, capsys):
    """Three images dealt to five shards: shards 3 and 4 would score nothing (NaN)."""
    code = run_cli(*bench.args(bundle, tmp_path / "out", "--shard", "3/5"))
    refused(capsys, code, EXIT_USAGE, "--shard 3/5: the 3 images of this run leave shard 3 none",
            "at most 3 shards")


# -- the data and the annotations ----------------------------------------------------------------

def _retyped(bench: Bench, column: str, values: list, tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(bench.parquet)
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    path = tmp_path / "Babillage2" / "coco" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, row_group_size=2)
    return path


@pytest.mark.parametrize("column,values,expected", [
    ("sample_id", [101, 102, None, 104, 105], "column sample_id, row 2: None is not an integer"),
    ("sample_id", ["101", "x", "103", "104", "105"], "column sample_id, row 1: 'x' is not"),
    ("question_transcript", [[1, 2]] * 5, "column question_transcript holds list<"),
    ("question_transcript", [1, 2, 3, 4, 5], "column question_transcript holds int64"),
])
def test_babillage_cells_of_the_wrong_kind(bench, bundle, tmp_path, capsys, column, values,
                                           expected):
    path = _retyped(bench, column, values, tmp_path)
    code = run_cli(*bench.args(bundle, tmp_path / "out"), "--data", path)
    refused(capsys, code, EXIT_ERROR, str(path), expected)


def _annotations(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / "ann.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


COCO_OK = json.loads(json.dumps({"images": [], "annotations": [
    {"image_id": i, "caption": "A house."} for i in (42, 7, 19)]}))


@pytest.mark.parametrize("content,expected", [
    (b'{"annotations": [{"image_id": 42, "caption": "caf\xe9"}]}', "line 1, column 50: not UTF-8"),
    (b'{"a": 1}\n\xff\xfe', "line 2, column 1: not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    ('{"annotations": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
    (json.dumps({"annotations": [{"image_id": "abc", "caption": "x"}]}),
     "annotations[0].image_id: 'abc' is not an integer id"),
    (json.dumps({"annotations": [{"image_id": None, "caption": "x"}]}),
     "annotations[0].image_id: None is not an integer id"),
    (json.dumps({"annotations": [{"image_id": 42, "caption": 7}]}),
     "annotations[0].caption: 7 is not a text"),
    (json.dumps({"annotations": ["x"]}), "annotations[0]: not COCO captions"),
    (json.dumps({**COCO_OK, "images": [{"id": "seven", "file_name": "a.jpg"}]}),
     "images[0].id: 'seven' is not an integer id"),
    (json.dumps({"images": [{"cocoid": "x", "sentences": []}]}),
     "images[0].cocoid: 'x' is not an integer id"),
    (json.dumps({"images": [{"cocoid": 42, "sentences": [{"raw": 5}]}]}),
     "images[0].sentences[0]: neither raw text nor a list of tokens"),
    ('{"annotations": [\n  {"image_id": 42,, }]}', "line 2, column 19: neither JSON nor"),
])
def test_coco_annotations_that_are_not(bench, bundle, tmp_path, capsys, content, expected):
    ann = _annotations(tmp_path, content)
    code = run_cli(*bench.args(bundle, tmp_path / "out", annotations=ann))
    refused(capsys, code, EXIT_ERROR, str(ann), expected)


@pytest.mark.parametrize("content,expected", [
    (json.dumps({"annotations": [{"question_id": None, "image_id": 42, "answers": []}]}),
     "annotations[0].question_id: None is not an integer id"),
    (json.dumps({"annotations": [{"question_id": 5001, "image_id": 42, "answers": 3}]}),
     "not VQAv2 annotations"),
    (json.dumps({"annotations": [{"question_id": q, "image_id": "x", "answers": ["a"]}
                                 for q in (5001, 5002, 5003)]}),
     "annotations[0].image_id: 'x' is not an integer id"),
    (json.dumps({"annotations": [{"question_id": q, "image_id": 42,
                                  "answers": [{"answer": 2}]} for q in (5001, 5002, 5003)]}),
     "annotations[0].answers[0].answer: 2 is not a text"),
])
def test_vqa_annotations_that_are_not(bundle, tmp_path, capsys, content, expected):
    from eval_support import VQA_QUESTIONS

    data = write_parquet(tmp_path / "vqa" / "validation-0.parquet", "vqav2", VQA_QUESTIONS,
                         [tone_bytes()] * 3)
    images = write_images(tmp_path / "images", [42, 7])
    vqa_annotations(tmp_path / "good.json")
    ann = _annotations(tmp_path, content)
    code = run_cli("--task", "vqav2", "--data", data, "--images", images, "--annotations", ann,
                   "--weights", bundle, "--out", tmp_path / "out")
    refused(capsys, code, EXIT_ERROR, str(ann), expected)


@pytest.mark.parametrize("content,expected", [
    ('{"sample_id": null, "answer": "x"}\n', "None is not an integer id"),
    ('{"sample_id": "abc", "answer": "x"}\n', "'abc' is not an integer id"),
    ('{"101": 42}', "the answer of sample 101: 42 is not a text"),
    ('{"101": {"a": 1}}', "the answer of sample 101"),
    ('{"sample_id": 101, "answer": "x"}\n{"sample_id": 102, "answer": "y"\n',
     "line 2, column 33: broken JSON Lines record"),
])
def test_ocrvqa_answers_that_are_not(bench, bundle, tmp_path, capsys, content, expected):
    ann = _annotations(tmp_path, content)
    code = run_cli("--task", "ocrvqa", "--data", bench.parquet, "--images", bench.images,
                   "--annotations", ann, "--weights", bundle, "--out", tmp_path / "out")
    refused(capsys, code, EXIT_ERROR, str(ann), expected)


# -- audio cells: each problem one line naming the file, the row and the column -------------------

def _wav(seconds: float, rate: int) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(int(seconds * rate), np.float32), rate, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("cell,expected", [
    ({"array": [0.1] * 100, "sampling_rate": -16000}, "-16000 Hz is not audio"),
    ({"array": [0.1] * 100, "sampling_rate": 0}, "0 Hz is not audio"),
    ({"array": [0.1] * 100, "sampling_rate": 1}, "1 Hz is not audio"),
    ({"array": [0.1] * 100, "sampling_rate": 2**31 - 1}, "2147483647 Hz is not audio"),
    ({"array": [0.1] * 100, "sampling_rate": "fast"}, "sampling_rate 'fast' is not a number"),
    ({"array": [0.1] * 100, "sampling_rate": 16000.5}, "16000.5 is not a number of Hz"),
    ({"array": [0.1] * 100}, "without its sampling_rate"),
    ({"array": [], "sampling_rate": 16000}, "the audio is empty"),
    ({"array": ["a", "b"], "sampling_rate": 16000}, "not numbers"),
    ({"array": [0.1, float("nan")], "sampling_rate": 16000}, "NaN or infinite"),
    ({"array": np.zeros(121 * 1000), "sampling_rate": 1000}, "lasts 121 s, longer than"),
    ({"bytes": b"", "path": "q.wav"}, "holds no bytes (only a path, q.wav)"),
    ({"bytes": b"RIFF0000WAVEgarbage", "path": None}, "cannot decode the audio"),
    ({"bytes": _wav(0.5, 500), "path": None}, "500 Hz is not audio"),
    ({"bytes": _wav(121, 1000), "path": None}, "lasts 121 s"),
    ({"bytes": _wav(0, 16000), "path": None}, "the audio is empty"),
])
def test_audio_cells_that_cannot_be_used(cell, expected):
    with pytest.raises(DataError) as e:
        decode_audio(cell, "f.parquet: row 3, column question_audio", max_seconds=120)
    assert str(e.value).startswith("f.parquet: row 3, column question_audio: ")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_rates_at_the_edges_are_read():
    pcm, rate = decode_audio({"array": [0.0] * 10, "sampling_rate": 16000.0}, "x")
    assert rate == 16000 and isinstance(rate, int)
    for rate in (1000, 768_000):
        assert decode_audio({"bytes": _wav(0.1, rate)}, "x")[1] == rate


def test_the_resampler_refuses_absurd_ratios_in_bounded_memory():
    """2^31 - 1 Hz to 24 kHz used to tabulate a filter of 1.5 billion taps (killed at 3.7
    GB); now refused at once. Run apart with 1 GB of address space and a minute."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "from moshivis_mlx.resample import Resampler, resample\n"
            "import numpy as np\n"
            "for rate in (2**31 - 1, 24000 * 257):\n"
            "    try:\n"
            "        Resampler(rate, 24000)\n"
            "    except ValueError as e:\n"
            "        assert 'at most 256 times fewer' in str(e), e\n"
            "    else:\n"
            "        raise SystemExit('accepted')\n"
            "assert len(resample(np.zeros(768000, np.float32), 768000, 8000)) == 8000\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env=app_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# -- eval's own files, edited by hand ----------------------------------------------------------

GOOD = {"index": 0, "sample_id": 101, "prediction": "A house.", "references": ["a house"]}


@pytest.mark.parametrize("lines,expected", [
    (["42"], "line 1: expected a JSON object (a prediction record), got int 42"),
    (['{"x": 1}'], "line 1: sample_id is None, expected an integer"),
    ([json.dumps(GOOD), '{"sample_id": "101", "index": 0}'], "line 2: sample_id is '101'"),
    ([json.dumps({**GOOD, "prediction": None})], "prediction is None, expected a text"),
    ([json.dumps({**GOOD, "references": "a house"})], "references is 'a house', expected a list"),
    ([json.dumps(GOOD), json.dumps(GOOD)], "line 2: sample 101 is already on line 1"),
    ([json.dumps(GOOD), "[" * 100_000], "line 2"),
    (['{"sample_id": 1,, }'], "line 1, column 17: broken record"),
])
def test_predictions_edited_by_hand(bench, bundle, tmp_path, capsys, lines, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text("".join(f"{x}\n" for x in lines))
    code = run_cli(*bench.args(bundle, out))
    refused(capsys, code, EXIT_ERROR, f"{out / 'predictions.jsonl'}: ", expected)
    assert (out / "predictions.jsonl").read_text() == "".join(f"{x}\n" for x in lines)


def test_predictions_that_are_not_utf8(bench, bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n{\"a\": \"\xff\"}\n")
    code = run_cli(*bench.args(bundle, out))
    refused(capsys, code, EXIT_ERROR, "predictions.jsonl: line 2, column 8: not UTF-8")


@pytest.mark.parametrize("content,expected", [
    (b"[1, 2]", "expected a JSON object (the run's settings), got list"),
    (b'{"task": "coco", "mode": "\xff"}', "byte 27: not UTF-8"),
    (b'{"task": 5, "mode": "audio", "planned": 5, "settings": {}}', "task is 5"),
    (b'{"task": "coco",\n "mode": }', "line 2, column 10: invalid JSON"),
    (b"[" * 100_000, "nested too deep"),
    (b"[" * 10 + b"]" * 10, "got list"),
    (b'{"task": "coco", "mode": "audio", "planned": 5, "settings": {}}',
     "settings.opening_s is None, expected seconds"),
])
def test_run_json_edited_by_hand(bench, bundle, tmp_path, capsys, content, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_bytes(content)
    code = run_cli(*bench.args(bundle, out))
    refused(capsys, code, EXIT_ERROR, f"{out / 'run.json'}: ", expected)
    assert (out / "run.json").read_bytes() == content


# -- --out: locked, and never an input ------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused(bench, bundle, tmp_path, capsys):
    """The first run holds --out's lock (here this process does, as a run would); the
    second is refused at once and writes nothing, with advice that fits moshivis-eval."""
    out = tmp_path / "out"
    with output_lock(out, fix="held by the test"):
        code = run_cli(*bench.args(bundle, out))
    line = refused(capsys, code, EXIT_ERROR, f"{out} is being written by another process "
                                               f"(pid {os.getpid()})",
                   "the same command then resumes", "give another --out")
    assert "choose another output" not in line
    assert not out.exists() or not any(out.iterdir())


def test_a_second_run_in_another_process_is_refused(bench, bundle, tmp_path):
    """Two processes: one holds the lock (as a running evaluation does), the other is
    refused; once the first ends, the lock file is gone."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom moshivis_mlx.fileio import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n"
         "    sys.stdin.readline()\n"],
        env=app_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "moshivis_mlx.cli.eval",
                            *map(str, bench.args(bundle, out))], env=app_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == EXIT_ERROR and f"(pid {holder.pid})" in r.stderr, r.stderr
        assert "loading" not in r.stdout
    finally:
        holder.communicate("\n", timeout=30)
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize("where", ["bundle", "inside-bundle", "data", "images", "annotations"])
def test_out_is_never_an_input(bench, bundle, tmp_path, capsys, where):
    own = Path(shutil.copytree(bundle, tmp_path / "b"))
    before = sorted(p.name for p in own.iterdir())
    out = {"bundle": own, "inside-bundle": own / "eval", "data": bench.data,
           "images": bench.images, "annotations": bench.annotations}[where]
    code = run_cli(*bench.args(own, out))
    refused(capsys, code, EXIT_USAGE, f"--out {out} ")
    assert sorted(p.name for p in own.iterdir()) == before


def test_out_that_is_a_file(bench, bundle, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("mine")
    code = run_cli(*bench.args(bundle, out))
    refused(capsys, code, EXIT_ERROR, f"cannot write the evaluation to {out}: it is a file")
    assert out.read_text() == "mine"


# -- merge ------------------------------------------------------------------------------------

def _shard(d: Path, i: int, n: int, **run) -> Path:
    d.mkdir(parents=True)
    settings = {"task": "coco", "split": "test", "mode": "audio", "bundle": "/b",
                "bundle_id": "aaaa", "quantization": "q8", "sampling": "greedy",
                "settings": {"opening_s": 2, "silence_s": 2, "max_answer_s": 30},
                "limit": None, "ptb": "python", "data": ["test.parquet"], "adapters": None,
                "adapters_id": None, "shard": [i, n], "planned": 1, **run}
    (d / "run.json").write_text(json.dumps(settings))
    (d / "predictions.jsonl").write_text(json.dumps({**GOOD, "index": i, "sample_id": 100 + i})
                                         + "\n")
    return d


def merge_cli(out, *shards) -> int:
    return run_cli("merge", "--out", out, *shards)


@pytest.mark.parametrize("other,expected", [
    ({"bundle_id": "bbbb"}, "their bundle_id differ"),
    ({"adapters": "/a", "adapters_id": "cccc"}, "their adapters differ"),
    ({"adapters_id": "cccc"}, "their adapters_id differ"),
    ({"settings": {"opening_s": 1, "silence_s": 2, "max_answer_s": 30}}, "their settings differ"),
])
def test_merge_refuses_shards_of_different_models(tmp_path, capsys, other, expected):
    a = _shard(tmp_path / "a", 0, 2)
    b = _shard(tmp_path / "b", 1, 2, **other)
    code = merge_cli(tmp_path / "m", a, b)
    refused(capsys, code, EXIT_USAGE, "are not shards of one evaluation", expected)
    assert not (tmp_path / "m").exists()


def test_merge_out_is_never_a_shard_or_a_run(bench, bundle, tmp_path, capsys):
    a, b = _shard(tmp_path / "a", 0, 2), _shard(tmp_path / "b", 1, 2)
    before = {p: p.read_bytes() for d in (a, b) for p in d.iterdir()}
    refused(capsys, merge_cli(a, a, b), EXIT_USAGE, f"--out {a} is shard {a}")
    refused(capsys, merge_cli(a / "m", a, b), EXIT_USAGE, f"--out {a / 'm'} is inside shard")
    run = _shard(tmp_path / "run", 0, 1)  # an evaluation (a run of its own, not given here)
    refused(capsys, merge_cli(run, a, b), EXIT_USAGE, f"--out {run} holds an evaluation")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "predictions.jsonl").write_text("mine\n")
    refused(capsys, merge_cli(tmp_path / "loose", a, b), EXIT_USAGE, "holds an evaluation")
    assert {p: p.read_bytes() for d in (a, b) for p in d.iterdir()} == before
    # A previous merge is replaced; a merge is no shard.
    assert merge_cli(tmp_path / "m", a, b) == 0
    assert merge_cli(tmp_path / "m", a, b) == 0
    capsys.readouterr()
    refused(capsys, merge_cli(tmp_path / "m2", tmp_path / "m"), EXIT_USAGE,
            "holds merged shards, not a shard")
    # Nor is a merge resumed as a run.
    refused(capsys, run_cli(*bench.args(bundle, tmp_path / "m")), EXIT_USAGE,
            "holds merged shards (made by moshivis-eval merge), not a run to resume")


def test_merge_of_a_shard_whose_run_json_was_edited(tmp_path, capsys):
    a = _shard(tmp_path / "a", 0, 2)
    b = _shard(tmp_path / "b", 1, 2, settings={})
    refused(capsys, merge_cli(tmp_path / "m", a, b), EXIT_ERROR,
            f"{b / 'run.json'}: settings.opening_s is None, expected seconds")


def test_merge_waits_for_a_shard_still_running(tmp_path, capsys):
    a, b = _shard(tmp_path / "a", 0, 2), _shard(tmp_path / "b", 1, 2)
    with output_lock(b):
        code = merge_cli(tmp_path / "m", a, b)
    refused(capsys, code, EXIT_ERROR, f"{b} is being written by another process",
            "a shard is still being evaluated")
    assert merge_cli(tmp_path / "m", a, b) == 0


def test_merge_of_shards_with_skipped_samples(tmp_path):
    a = _shard(tmp_path / "a", 0, 2)
    b = _shard(tmp_path / "b", 1, 2)
    with open(b / "predictions.jsonl", "a") as f:
        f.write(json.dumps({"index": 5, "sample_id": 105, "skipped": "x: the audio is empty"})
                + "\n")
    assert merge_cli(tmp_path / "m", a, b) == 0
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["samples_scored"] == 2 and m["samples_skipped"] == 1
    assert m["skipped"] == [{"sample_id": 105, "reason": "x: the audio is empty"}]


# -- a bundle rebuilt at the same path is another bundle ------------------------------------------

def test_a_rebuilt_bundle_is_not_resumed_nor_merged(bench, bundle, tmp_path, capsys):
    from moshivis_mlx.eval.run import RESUMED_SAME, _check_resumable
    from moshivis_mlx.fileio import fingerprint

    own = Path(shutil.copytree(bundle, tmp_path / "b"))
    first = fingerprint(own)
    assert fingerprint(Path(shutil.copytree(own, tmp_path / "copy"))) == first  # a copy
    weights = own / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # the last weight changes, size and header do not
    weights.write_bytes(bytes(data))
    assert fingerprint(own) != first
    assert "bundle_id" in RESUMED_SAME
    out = tmp_path / "out"
    out.mkdir()
    old = {"task": "coco", "mode": "audio", "planned": 5, "bundle_id": first,
           "settings": {"opening_s": 2, "silence_s": 2, "max_answer_s": 30}}
    (out / "run.json").write_text(json.dumps(old))
    with pytest.raises(MoshivisError, match="another bundle content .the bundle was rebuilt"):
        _check_resumable(out, {**old, "bundle_id": fingerprint(own)})


# -- --hf-repo FOLDER: the cache follows the folder's files --------------------------------------

def test_hf_repo_folder_is_converted_again_when_its_weights_change(bundle, tmp_path,
                                                                   monkeypatch):
    from moshivis_mlx.weights_convert.hub import bundle_for_repo

    monkeypatch.setenv("MOSHIVIS_MLX_CACHE", str(tmp_path / "cache"))
    folder = Path(shutil.copytree(bundle, tmp_path / "repo"))
    first = bundle_for_repo(str(folder), "none")
    mimi = (first / "mimi.safetensors").read_bytes()
    assert bundle_for_repo(str(folder), "none") == first  # unchanged: the cache is used
    assert (first / "mimi.safetensors").read_bytes() == mimi

    import mlx.core as mx

    weights = mx.load(str(folder / "mimi.safetensors"))
    name = sorted(k for k, v in weights.items() if v.dtype == mx.float32)[0]
    weights[name] = weights[name] + 1.0
    mx.save_safetensors(str(folder / "mimi.safetensors"), weights)
    again = bundle_for_repo(str(folder), "none")
    after = mx.load(str(again / "mimi.safetensors"))
    assert mx.allclose(after[name], weights[name]).item(), "the stale conversion was used"


def test_a_conversion_in_progress_is_waited_for_not_another_output(bundle, tmp_path,
                                                                    monkeypatch):
    """The app (and eval, train) convert into the cache: a second one meanwhile is told to
    wait; none of them has an option for another output."""
    from moshivis_mlx.weights_convert.hub import HubError, bundle_for_repo, bundle_path

    monkeypatch.setenv("MOSHIVIS_MLX_CACHE", str(tmp_path / "cache"))
    folder = Path(shutil.copytree(bundle, tmp_path / "repo"))
    (tmp_path / "cache").mkdir()
    with output_lock(bundle_path(str(folder), "none")):
        with pytest.raises(HubError) as e:
            bundle_for_repo(str(folder), "none")
    text = str(e.value)
    assert "is being written by another process" in text and "wait for it to finish" in text
    assert "another output" not in text and "--out" not in text, text


# -- the app: a 10000 x 1 PNG, a full disk under --record -----------------------------------------

@pytest.mark.parametrize("size", [(10000, 1), (1, 10000), (10000, 3), (30000, 2)])
def test_thin_images_load(tmp_path, size):
    from PIL import Image

    from moshivis_mlx.image import load_image, preprocess

    path = tmp_path / "thin.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and min(img.size) >= 1
    x = preprocess(path, 64)
    assert x.shape == (64, 64, 3) and np.isfinite(x).all()


@pytest.mark.slow
def test_record_on_a_full_disk_names_the_file_and_keeps_the_transcript(bundle, tmp_path,
                                                                      monkeypatch, capsys):
    """The disk fills while the conversation is recorded. Simulated: the recording's WAV
    writes raise ENOSPC after 1 s of audio (as a full disk makes them); its header, a
    rewrite in place, still goes through. The session ends with one line naming the WAV,
    and every other file is completed: transcript.json included."""
    from moshivis_mlx.app import audio as audio_mod
    from moshivis_mlx.app.demo import SAMPLE_IMAGE
    from moshivis_mlx.wav import WavWriter

    sd = FakeSoundDevice()
    monkeypatch.setattr(audio_mod, "load_backend", lambda: sd)
    write = WavWriter.write

    def filling(self, samples):
        if self.frames >= 24000 and self.path.name == "conversation.wav":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, samples)

    monkeypatch.setattr(WavWriter, "write", filling)
    rec = tmp_path / "rec"
    code = run_main("--weights", str(bundle), "--image", str(SAMPLE_IMAGE), "--record", str(rec))
    out = capsys.readouterr()
    lines = [x for x in out.err.splitlines() if "error" in x]
    assert code == EXIT_ERROR and len(lines) == 1, out.err
    assert f"cannot write {rec / 'conversation.wav'}: No space left on device" in lines[0]
    assert "free some space" in lines[0] and "Traceback" not in out.err
    assert f"session saved to {rec}" in out.out
    transcript = json.loads((rec / "transcript.json").read_text())
    assert transcript["events"][-1]["event"] == "error"
    assert "No space left on device" in transcript["events"][-1]["message"]
    assert not (rec / "transcript.jsonl").exists()
    session = json.loads((rec / "session.json").read_text())
    assert session["complete"] and session["frames"] == 24000 // 1920 + 1
    from moshivis_mlx.wav import read_wav

    audio, rate = read_wav(rec / "conversation.wav")  # its header says what it holds
    assert rate == 24000 and audio.shape[0] == session["frames"] * 1920


@pytest.mark.slow
def test_record_when_nothing_can_be_written_any_more(bundle, tmp_path, monkeypatch, capsys):
    """Worse: after 1 s no new file can be made (session.json's rewrite, transcript.json)
    and the WAV takes no more audio, as on a disk filled to the last block (checked by
    hand on a 200 kB tmpfs too). Still one line naming the file, no traceback; the output
    says which files are not complete and that the words are in transcript.jsonl, which
    is kept, one whole JSON object a line."""
    from moshivis_mlx.app import audio as audio_mod
    from moshivis_mlx.app import recorder as recorder_mod
    from moshivis_mlx.app import transcript as transcript_mod
    from moshivis_mlx.wav import WavWriter

    sd = FakeSoundDevice()
    monkeypatch.setattr(audio_mod, "load_backend", lambda: sd)
    full = {"now": False}
    write = WavWriter.write

    def filling(self, samples):
        if self.frames >= 24000:
            full["now"] = True
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, samples)

    def no_room(*a, **k):
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return atomic(*a, **k)

    atomic = recorder_mod.atomic_write
    writer = transcript_mod.atomic_writer
    monkeypatch.setattr(WavWriter, "write", filling)
    monkeypatch.setattr(recorder_mod, "atomic_write", no_room)

    def no_room_for_the_document(*a, **k):
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return writer(*a, **k)

    monkeypatch.setattr(transcript_mod, "atomic_writer", no_room_for_the_document)
    rec = tmp_path / "rec"
    code = run_main("--weights", str(bundle), "--no-image", "--record", str(rec))
    out = capsys.readouterr()
    lines = [x for x in out.err.splitlines() if "error" in x]
    assert code == EXIT_ERROR and len(lines) == 1 and "Traceback" not in out.err, out.err
    assert f"cannot write {rec / 'conversation.wav'}: No space left on device" in lines[0]
    assert (f"session partly saved to {rec}/" in out.out and "not completed: transcript.json, "
            "session.json; the words are in transcript.jsonl" in out.out), out.out
    session = json.loads((rec / "session.json").read_text())  # the last one written whole
    assert session["complete"] is False
    assert not (rec / "transcript.json").exists()
    log = [json.loads(x) for x in (rec / "transcript.jsonl").read_text().splitlines()]
    assert log[0]["type"] == "header"


# -- a sample that cannot be asked is skipped, said, counted; the run goes on ------------------

@pytest.mark.slow
def test_bad_audio_cells_mid_dataset_are_skipped_and_listed(bundle, tmp_path, capsys):
    """Samples 102 (an empty cell), 103 (not audio) and 104 (500 Hz) cannot be asked: each
    is one line naming the file, the row and the column, the run goes on, and metrics.json
    counts and lists them. A rerun does not stop there again (nor ask them again)."""
    audio = [tone_bytes(0.3), b"", b"RIFF....WAVEnot audio", _wav(0.5, 500), tone_bytes(0.3)]
    bench = Bench(tmp_path, audio)
    out = tmp_path / "out"
    assert run_cli(*bench.args(bundle, out)) == 0
    said = capsys.readouterr().out
    for sid, row, why in ((102, 1, "holds no bytes"), (103, 2, "cannot decode the audio"),
                          (104, 3, "500 Hz is not audio")):
        line = next(x for x in said.splitlines() if f"(sample {sid})" in x)
        assert line.startswith(f"skipped: {bench.parquet}: row {row}, column question_audio "
                               f"(sample {sid}): ") and why in line, line
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples_scored"] == 2 and m["samples_skipped"] == 3 and m["complete"]
    assert [s["sample_id"] for s in m["skipped"]] == [102, 103, 104]
    assert "500 Hz" in m["skipped"][2]["reason"]
    assert "| samples skipped | 3" in (out / "results.md").read_text()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 5

    assert run_cli(*bench.args(bundle, out)) == 0
    again = capsys.readouterr().out
    assert "5 done already (3 skipped)" in again and "loading" not in again
    assert "3 skipped (see metrics.json)" in again
    assert (out / "predictions.jsonl").read_text().splitlines() == lines


@pytest.mark.slow
def test_empty_and_overlong_text_questions_are_skipped(bundle, tmp_path, capsys):
    """--mode text: an empty transcript, and one of more tokens than two minutes of
    frames, are skipped with a note; the others are asked."""
    questions = [(101, 42, "Describe it."), (102, 42, ""), (103, 7, "word " * 2000),
                 (104, 7, "What is it?"), (105, 19, "And this?")]
    bench = Bench(tmp_path, questions=questions)
    out = tmp_path / "out"
    assert run_cli(*bench.args(bundle, out, "--mode", "text")) == 0
    said = capsys.readouterr().out
    assert (f"skipped: {bench.parquet}: row 1, column question_transcript (sample 102): "
            f"the question is empty") in said
    assert "row 2, column question_transcript (sample 103): the question is " in said
    assert "tokens, more than the 120 s (1500 tokens) a question may last" in said
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples_scored"] == 3 and [s["sample_id"] for s in m["skipped"]] == [102, 103]


@pytest.mark.slow
def test_a_long_question_is_announced(bundle, tmp_path, capsys):
    """A 31 s question (past LONG_QUESTION_S) is said before its conversation starts."""
    audio = [tone_bytes(31.0, 8000)] + [tone_bytes(0.3)] * 4
    bench = Bench(tmp_path, audio)
    assert run_cli(*bench.args(bundle, tmp_path / "out", "--limit", "1")) == 0
    assert "sample 101: a 31 s question" in capsys.readouterr().out


# -- signals: what survives ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGKILL", None)])
def test_a_stopped_run_keeps_its_predictions_and_resumes(bundle, tmp_path, sig, code):
    """Stopped after its first prediction: SIGTERM and SIGHUP end it with 128 + the signal,
    SIGKILL at once. Every prediction written is whole, no metrics.json claims a score,
    and the rerun (which takes the lock a killed run could not remove) finishes the other
    samples and leaves no lock behind."""
    import signal
    import time

    bench = Bench(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moshivis_mlx.cli.eval", *map(str, bench.args(bundle, out))]
    p = subprocess.Popen(cmd, env=app_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pred = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 1:
            os.kill(p.pid, getattr(signal, sig))
            break
        time.sleep(0.01)
    _, err = p.communicate(timeout=60)
    assert p.returncode == (code if code is not None else -signal.SIGKILL), err.decode()
    if code is not None:
        assert err.decode().strip().splitlines()[-1] == "moshivis-eval: interrupted"
        assert not (tmp_path / ".out.lock").exists()
    done = [json.loads(x) for x in pred.read_text().splitlines()]
    assert 1 <= len(done) < 5 and not (out / "metrics.json").exists()
    assert run_cli(*bench.args(bundle, out)) == 0
    records = [json.loads(x) for x in pred.read_text().splitlines()]
    assert [r["sample_id"] for r in records] == [q[0] for q in COCO_QUESTIONS]
    assert records[:len(done)] == done
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize("quantization,expected", [
    ({"bits": 3, "group_size": 64}, "bits must be one of"), ({"bits": "x"}, "bits must be"),
    ("q8", "quantization must be"), ({"bits": 8, "group_size": 7}, "group size must be"),
    (7, "quantization must be"),
])
def test_a_bad_quantization_in_the_config_names_the_file(bundle, tmp_path, capsys,
                                                         quantization, expected):
    from moshivis_mlx.app.demo import SAMPLE_SPEECH

    own = Path(shutil.copytree(bundle, tmp_path / "b"))
    cfg = json.loads((own / "config.json").read_text())
    cfg["quantization"] = quantization
    (own / "config.json").write_text(json.dumps(cfg))
    code = run_main("--weights", str(own), "--no-image", "--input-wav", str(SAMPLE_SPEECH),
                    "--output-wav", str(tmp_path / "o.wav"))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("moshivis-mlx: error: ")]
    assert code == EXIT_WEIGHTS and len(lines) == 1, err
    assert f"{own / 'config.json'}: " in lines[0] and expected in lines[0], lines[0]


def test_inputs_that_are_pipes_or_files_for_folders(bench, bundle, tmp_path, capsys):
    """A FIFO for --annotations used to block the run forever (nobody writes into it)."""
    fifo = tmp_path / "ann.json"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "moshivis_mlx.cli.eval",
                        *map(str, bench.args(bundle, tmp_path / "out", annotations=fifo))],
                       env=app_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_ERROR and "not a regular file (a pipe or a device)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    images = tmp_path / "images.txt"
    images.write_text("not a folder")
    code = run_cli(*bench.args(bundle, tmp_path / "out"), "--images", images)
    refused(capsys, code, 5, f"image folder {images} is not a directory")


@pytest.mark.slow
def test_an_image_that_cannot_be_decoded_skips_its_questions(bundle, tmp_path, capsys):
    bench = Bench(tmp_path)
    broken = bench.images / "COCO_val2014_000000000007.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = tmp_path / "out"
    assert run_cli(*bench.args(bundle, out)) == 0
    said = capsys.readouterr().out
    assert f"skipped: {broken}: " in said
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples_scored"] == 3 and [s["sample_id"] for s in m["skipped"]] == [103, 104]
    assert "(the image of sample 103)" in m["skipped"][0]["reason"]


def test_merge_reads_shards_from_a_read_only_place(tmp_path, monkeypatch):
    """Shards copied to read-only media: their locks cannot be made there (simulated: the
    lock file's creation is refused with EROFS beside the shards); the merge still goes."""
    from moshivis_mlx import fileio

    a = _shard(tmp_path / "ro" / "a", 0, 2)
    b = _shard(tmp_path / "ro" / "b", 1, 2)
    real_open = os.open

    def read_only(path, flags, *args, **kw):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(fileio.os, "open", read_only)
    assert merge_cli(tmp_path / "m", a, b) == 0
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["samples_scored"] == 2
