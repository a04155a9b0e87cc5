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

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import MoshivisError, UsageError
from ..fileio import atomic_write
from .metrics import score_task

RUN = "run.json"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RESULTS = "results.md"

TASK_NAMES = {"coco": "COCO captions (Babillage)", "vqav2": "VQAv2 (Babillage)",
              "ocrvqa": "OCR-VQA (Babillage)"}
TIMING_FIELDS = ("model_s", "image_s", "seconds")
"""Fields of a prediction that differ between identical runs."""


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file. A last line cut short (the run was killed while
    writing it) is removed from the file, so that sample is simply done again."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good = [], 0
    for i, line in enumerate(lines[:-1]):  # complete lines end with a newline
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i < len(lines) - 2:
                raise MoshivisError(f"{path}: broken record on line {i + 1}",
                                    "remove that line, or start again in another --out") from None
            break
        good += len(line) + 1
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


def read_run(out: Path) -> dict[str, Any] | None:
    path = Path(out) / RUN
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoshivisError(f"{path}: invalid JSON ({e})") from None


def write_run(out: Path, run: dict[str, Any]) -> None:
    atomic_write(Path(out) / RUN, json.dumps(run, indent=2) + "\n")


# -- metrics and the table ------------------------------------------------------------------

def summarise(run: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's content: the task's score over `records` and the run's facts."""
    records = sorted(records, key=lambda r: r["index"])
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
        "complete": len(records) >= planned,
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

SAME = ("task", "split", "mode", "bundle", "quantization", "sampling", "settings", "limit",
        "ptb", "data")


def merge(out: Path, shard_dirs: Iterable[Path]) -> dict[str, Any]:
    """Joins the shards of one evaluation into `out` (predictions, metrics, table)."""
    shard_dirs = [Path(d) for d in shard_dirs]
    if not shard_dirs:
        raise UsageError("merge needs the shard directories")
    runs, records = [], {}
    for d in shard_dirs:
        run = read_run(d)
        if run is None:
            raise UsageError(f"{d}: no {RUN}; is it an output directory of moshivis-eval?")
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
