"""What a run will read and write, checked before anything loads.

A 7B model takes a while to load; an output that cannot be written, or that would
overwrite the question, the picture or the model itself, is refused first, in one line
(paths.py: `check_outputs`, `check_writable`). Nothing is created here.
"""

from __future__ import annotations

from pathlib import Path

from ..paths import check_outputs, check_writable
from .options import AppOptions
from .recorder import DEFAULT_ROOT, FILES, existing_session, session_taken
from .transcript import log_path

RECORD_FIX = "pick another directory with --record DIR, or use --no-record"


def bundle_location(opts: AppOptions) -> Path | None:
    """Where the bundle is or will be (no download): --weights, else the cache's."""
    b = opts.model.bundle
    if b.weights is not None:
        return Path(b.weights).expanduser()
    from moshivis_mlx.weights_convert.hub import bundle_path

    return bundle_path(b.hf_repo, b.quantize or "q8")


def _inputs(opts: AppOptions, bundle: Path | None) -> dict[str, Path | None]:
    return {"--input-wav": Path(opts.input_wav) if opts.input_wav else None,
            "--image": Path(opts.image) if opts.image else None,
            "the bundle": bundle}


def check_file_mode(opts: AppOptions, bundle: Path | None = None) -> None:
    """--output-wav and --transcript (and the transcript's log) are new paths, writable."""
    bundle = bundle if bundle is not None else bundle_location(opts)
    outputs: dict[str, Path | None] = {"--output-wav": opts.output_wav}
    if opts.transcript is not None:
        outputs["--transcript"] = opts.transcript
        outputs[f"the transcript's log {log_path(opts.transcript).name}"] = \
            log_path(opts.transcript)
    check_outputs(outputs, _inputs(opts, bundle))
    check_writable(opts.output_wav, "write the output")
    if opts.transcript is not None:
        check_writable(opts.transcript, "write the transcript")


def check_live(opts: AppOptions) -> None:
    """The recording directory: writable, holding no earlier session, apart from the
    inputs."""
    if not opts.record:
        return
    directory = opts.record_dir
    if directory is None:
        check_writable(DEFAULT_ROOT, "record the session in", directory=True, fix=RECORD_FIX)
        return
    if directory.is_dir() and (found := existing_session(directory)):
        raise session_taken(directory, found)
    check_outputs({f"--record {directory / name}": directory / name for name in FILES},
                  _inputs(opts, bundle_location(opts)))
    check_writable(directory, "record the session in", directory=True, fix=RECORD_FIX)
