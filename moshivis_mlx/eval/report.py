"""An evaluation's files: predictions (JSON Lines, written as they come), the run's
settings, metrics.json and results.md; and joining the shards of one evaluation.

    OUT/run.json            what was run: task, mode, data, bundle, quantization, settings,
                            shard, the sample ids planned
    OUT/predictions.jsonl   one record per sample, flushed as each is done (a rerun skips
                            the sample ids already there)
    OUT/metrics.json        the scores (headline and lenient) with 95% intervals, time per sample
    OUT/results.md          the same as a table

metrics.json and results.md are written atomically (a temporary file renamed), so a
reader never sees half of one.
"""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..errors import MoshivisError, UsageError
from ..fileio import atomic_write, output_lock
from ..paths import check_outputs, check_writable
from .metrics import score_task

RUN = "run.json"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RESULTS = "results.md"

TASK_NAMES = {"coco": "COCO captions (Babillage)", "vqav2": "VQAv2 (Babillage)",
              "ocrvqa": "OCR-VQA (Babillage)"}
TIMING_FIELDS = ("model_s", "image_s", "seconds")
"""Fields of a prediction that differ between identical runs."""


RECORD_FIX = "correct or remove that line (its sample is then asked again), or use another --out"


def _record_problem(r: Any) -> str | None:
    """What is wrong with a prediction record (None: nothing): the fields the scores and
    a resume read, of their types."""
    if not isinstance(r, dict):
        return f"expected a JSON object (a prediction record), got {type(r).__name__} {r!r:.40}"
    for key, types in (("sample_id", int), ("index", int)):
        if not isinstance(r.get(key), types) or isinstance(r.get(key), bool):
            return f"{key} is {r.get(key)!r:.40}, expected an integer"
    if "skipped" in r:
        return None if isinstance(r["skipped"], str) else "skipped is not a text"
    if not isinstance(r.get("prediction"), str):
        return f"prediction is {r.get('prediction')!r:.40}, expected a text"
    refs = r.get("references")
    if not isinstance(refs, list) or not all(isinstance(x, str) for x in refs):
        return f"references is {refs!r:.40}, expected a list of texts"
    return None


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file, each checked (a line edited by hand is one
    line of error naming the file, the line and the column). A last line cut short (no
    newline: the run was killed while writing it) is removed from the file, so that
    sample is simply done again."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    for i, line in enumerate(lines[:-1]):  # complete lines end with a newline
        n = i + 1
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MoshivisError(f"{path}: line {n}, column {e.start + 1}: not UTF-8 text",
                                RECORD_FIX) from None
        except json.JSONDecodeError as e:
            raise MoshivisError(f"{path}: line {n}, column {e.colno}: broken record "
                                f"({e.msg})", RECORD_FIX) from None
        except RecursionError:
            raise MoshivisError(f"{path}: line {n}: nested too deep to be a record",
                                RECORD_FIX) from None
        problem = _record_problem(record)
        if problem:
            raise MoshivisError(f"{path}: line {n}: {problem}", RECORD_FIX)
        sid = record["sample_id"]
        if sid in seen:
            raise MoshivisError(f"{path}: line {n}: sample {sid} is already on line {seen[sid]}",
                                RECORD_FIX)
        seen[sid] = n
        records.append(record)
    good = len(data) - len(lines[-1])
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


class PredictionWriter:
    """Appends one JSON line per sample and flushes it to disk at once."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


RUN_FIELDS = {"task": str, "mode": str, "planned": int, "settings": dict}
"""run.json's fields that the reports read, and their types."""


def read_run(out: Path) -> dict[str, Any] | None:
    """OUT/run.json (None: there is none), checked: a JSON object, UTF-8, with the fields
    the reports read of their types; anything else is one line naming the file."""
    path = Path(out) / RUN
    if not path.exists():
        return None
    fix = "restore it, or use another --out"
    try:
        run = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MoshivisError(f"{path}: byte {e.start + 1}: not UTF-8 text", fix) from None
    except json.JSONDecodeError as e:
        raise MoshivisError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON "
                            f"({e.msg})", fix) from None
    except RecursionError:
        raise MoshivisError(f"{path}: nested too deep to be a run's settings", fix) from None
    if not isinstance(run, dict):
        raise MoshivisError(f"{path}: expected a JSON object (the run's settings), got "
                            f"{type(run).__name__}", fix)
    for key, kind in RUN_FIELDS.items():
        if not isinstance(run.get(key), kind) or isinstance(run.get(key), bool):
            raise MoshivisError(f"{path}: {key} is {run.get(key)!r:.40}, expected "
                                f"{'an integer' if kind is int else kind.__name__}", fix)
    settings = run["settings"]
    for key in ("opening_s", "silence_s", "max_answer_s"):
        v = settings.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise MoshivisError(f"{path}: settings.{key} is {v!r:.40}, expected seconds", fix)
    shard = run.get("shard")
    if shard is not None and not (isinstance(shard, list) and len(shard) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in shard)):
        raise MoshivisError(f"{path}: shard is {shard!r:.40}, expected [I, N]", fix)
    return run


def write_run(out: Path, run: dict[str, Any]) -> None:
    atomic_write(Path(out) / RUN, json.dumps(run, indent=2) + "\n")


# -- metrics and the table ------------------------------------------------------------------

def summarise(run: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's content: the task's score over `records` and the run's facts."""
    skipped = sorted((r for r in records if "skipped" in r), key=lambda r: r["index"])
    records = sorted((r for r in records if "skipped" not in r), key=lambda r: r["index"])
    scored = score_task(run["task"], [r["prediction"] for r in records],
                        [r["references"] for r in records], run.get("ptb", "python"))
    per_sample = scored.pop("per_sample")
    per_norm = scored.pop("per_sample_normalised")
    times = [sum(r.get(k) or 0.0 for k in ("model_s", "image_s")) for r in records]
    answer_s = [r.get("answer_s", 0.0) for r in records]
    planned = run.get("planned", len(records))
    metrics = {
        "task": run["task"], "split": run.get("split"), "mode": run["mode"],
        "bundle": run.get("bundle"), "quantization": run.get("quantization"),
        "sampling": run.get("sampling"), "settings": run.get("settings"),
        "samples_scored": len(records), "samples_planned": planned,
        "samples_skipped": len(skipped),
        "complete": len(records) + len(skipped) >= planned,
        "skipped": [{"sample_id": r["sample_id"], "reason": r["skipped"]} for r in skipped],
        **scored,
        "time_per_sample_s": sum(times) / len(times) if times else None,
        "mean_answer_s": sum(answer_s) / len(answer_s) if answer_s else None,
        "stops": dict(Counter(r.get("stop") for r in records)),
        "per_sample": {str(r["sample_id"]): [round(a, 4), round(b, 4)]
                       for r, a, b in zip(records, per_sample, per_norm)},
    }
    if run.get("shards"):
        metrics["shards"] = run["shards"]
    return metrics


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def results_table(m: dict[str, Any]) -> str:
    """results.md: one table, then what the numbers mean."""
    lo, hi = m["ci95"]
    nlo, nhi = m["normalised_ci95"]
    done = f"{m['samples_scored']}" + ("" if m["complete"] else f" of {m['samples_planned']}"
                                      f" planned (incomplete)")
    rows = [
        ("task", f"{TASK_NAMES.get(m['task'], m['task'])}, split {m.get('split')}"),
        ("mode", f"{m['mode']} prompts"),
        ("bundle", f"`{m.get('bundle')}`"),
        ("quantization", m.get("quantization")),
        ("decoding", m.get("sampling")),
        ("samples scored", done),
        *([("samples skipped", f"{m['samples_skipped']} (their audio or text cannot be "
                                f"used; listed in metrics.json)")] if m.get("samples_skipped")
          else []),
        (f"{m['metric']} ({m['score_name']})",
         f"**{_fmt(m['score'])}** {m['units'].replace('CIDEr x 100', '')}"
         f"(95% CI {_fmt(lo)}-{_fmt(hi)})".replace("  ", " ")),
        *[(f"{m['metric']} ({o['name']})", f"{_fmt(o['score'])} (95% CI {_fmt(o['ci95'][0])}-"
                                           f"{_fmt(o['ci95'][1])})") for o in m["other_scores"]],
        (f"{m['metric']} ({m['normalised_name']})",
         f"{_fmt(m['normalised_score'])} (95% CI {_fmt(nlo)}-{_fmt(nhi)})"),
        ("time per sample", f"{_fmt(m['time_per_sample_s'], 2)} s (model and image encoding, "
                            f"wall clock)"),
        ("answers ended by", ", ".join(f"{k} {v}" for k, v in sorted(m["stops"].items(),
                                                                   key=lambda kv: str(kv[0])))),
    ]
    lines = [f"# {TASK_NAMES.get(m['task'], m['task'])}: {m['mode']} prompts", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    notes = [
        "",
        f"* Confidence interval: {m['ci_method']}.",
        f"* {m['score_name'].capitalize()}: the model's answer text as it spoke it"
        + (f", tokenized as COCO's evaluation does ({m['tokenizer']})." if m["task"] == "coco"
           else f"; {m['answer_normalisation']}."),
        *[f"* {o['name'].capitalize()}: {o['rule']}." for o in m["other_scores"]],
        f"* {m['normalised_name'].capitalize()}: {m['normalisation']}.",
        f"* 'silence': the model spoke, then was silent for {m['settings']['silence_s']} s; "
        f"'cap': it was still going (or never spoke) {m['settings']['max_answer_s']} s after "
        f"the question.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_reports(out: Path, run: dict[str, Any], records: list[dict[str, Any]]) -> dict:
    metrics = summarise(run, records)
    atomic_write(Path(out) / METRICS, json.dumps(metrics, indent=2) + "\n")
    atomic_write(Path(out) / RESULTS, results_table(metrics))
    return metrics


# -- shards ---------------------------------------------------------------------------------

SAME = ("task", "split", "mode", "bundle", "bundle_id", "quantization", "sampling",
        "settings", "limit", "ptb", "data", "adapters", "adapters_id")
"""What the shards of one evaluation share (a key older shards lack reads as None)."""
SHARD_LOCK_FIX = "a shard is still being evaluated: wait for its run to finish, then merge"


def _check_merge_out(out: Path, shard_dirs: list[Path]) -> None:
    """`out` is none of the shards (nor inside one), and holds no evaluation of its own:
    merging over a run's files would make it impossible to resume. A previous merge
    may be replaced."""
    check_outputs({"--out": out}, {f"shard {d}": d for d in shard_dirs})
    check_writable(out, "write the merged evaluation to", directory=True)
    if not out.is_dir():
        return
    run = read_run(out)
    if (run is not None and not run.get("merged_from")) or \
            (run is None and (out / PREDICTIONS).exists()):
        raise UsageError(f"--out {out} holds an evaluation (its {RUN} or {PREDICTIONS}): "
                         f"merging there would write over it", "give merge a new --out")


def merge(out: Path, shard_dirs: Iterable[Path]) -> dict[str, Any]:
    """Joins the shards of one evaluation into `out` (predictions, metrics, table).
    `out` and the shards are locked meanwhile: a shard still being evaluated, or a second
    merge into the same `out`, is refused."""
    shard_dirs = [Path(d).expanduser() for d in shard_dirs]
    out = Path(out).expanduser()
    if not shard_dirs:
        raise UsageError("merge needs the shard directories")
    for d in shard_dirs:
        if not d.is_dir():
            raise UsageError(f"{d}: no such directory (a shard is an --out of moshivis-eval)")
    _check_merge_out(out, shard_dirs)
    with ExitStack() as locks:
        locks.enter_context(output_lock(out, fix="wait for that merge to finish"))
        for d in shard_dirs:
            try:
                locks.enter_context(output_lock(d, fix=SHARD_LOCK_FIX))
            except OSError as e:  # a read-only copy of a shard: no run can be writing it
                if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
        return _merge(out, shard_dirs)


def _merge(out: Path, shard_dirs: list[Path]) -> dict[str, Any]:
    runs, records = [], {}
    for d in shard_dirs:
        run = read_run(d)
        if run is None:
            raise UsageError(f"{d}: no {RUN}; is it an output directory of moshivis-eval?")
        if run.get("merged_from"):
            raise UsageError(f"{d} holds merged shards, not a shard",
                             "merge the shards themselves")
        runs.append((d, run))
        for r in read_predictions(d / PREDICTIONS):
            prev = records.get(r["sample_id"])
            if prev is not None and _comparable(prev) != _comparable(r):
                raise MoshivisError(f"sample {r['sample_id']} has different predictions in two "
                                    f"shards ({d})")
            records[r["sample_id"]] = r
    first_dir, first = runs[0]
    for d, run in runs[1:]:
        for k in SAME:
            if run.get(k) != first.get(k):
                raise UsageError(f"{d} and {first_dir} are not shards of one evaluation: "
                                 f"their {k} differ ({run.get(k)!r} vs {first.get(k)!r})")
    shards = sorted(tuple(run.get("shard") or (0, 1)) for _, run in runs)
    if len({n for _, n in shards}) > 1:
        raise UsageError("these are shards of different splits: "
                         + ", ".join(f"{d} is {i}/{n}" for d, (i, n) in
                                     zip(shard_dirs, (tuple(r.get("shard") or (0, 1))
                                                      for _, r in runs))))
    if len(set(shards)) < len(shards):
        raise UsageError("a shard is given twice")
    total = shards[0][1]
    missing = sorted(set(range(total)) - {i for i, _ in shards})
    merged = {k: first.get(k) for k in SAME}
    merged["planned"] = sum(run.get("planned", 0) for _, run in runs)
    merged["shards"] = {"of": total, "merged": [i for i, _ in shards], "missing": missing}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records.values(), key=lambda r: r["index"])
    atomic_write(out / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                            for r in ordered))
    write_run(out, {**merged, "merged_from": [str(d) for d in shard_dirs]})
    return write_reports(out, merged, ordered)


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}
