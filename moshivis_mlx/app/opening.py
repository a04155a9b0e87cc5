"""The opening sequence, the same for live mode, file mode and the demo: open the model
(`moshivis_mlx.load`: the bundle found, or downloaded and converted once, its models loaded
and checked together), build the generator and the stream, set the first image, and make
the session around it.

The first image is decoded by the caller (`session.load_picture`) before any of this: a bad
file should not wait for a 7B model to load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generate import Generator
from ..loader import Loaded, load, resolve
from ..progress import Steps
from ..session import Session
from .options import ModelOptions

NO_IMAGE_FLAG = "--no-image"


@dataclass
class Opened:
    """A session ready to talk, and the bundle it was made from."""

    bundle: Path
    session: Session


def opening_steps(want_vision: bool, first_image: bool) -> int:
    """The steps `open_session` shows (a download and a conversion add theirs)."""
    return 3 + want_vision + first_image


def open_session(opts: ModelOptions, steps: Steps, want_vision: bool,
                 image: str | None = None, picture: Any = None,
                 bundle: Path | None = None) -> Opened:
    """Bundle (`bundle`, else resolved here) -> models -> generator -> stream -> session,
    with `picture` (decoded from `image`) as the first image if given. Runs on the thread
    that will step the stream."""
    bundle = bundle if bundle is not None else resolve_bundle(opts, steps)
    model = load(bundle, adapters=opts.bundle.adapters, vision=want_vision,
                 no_vision_flag=NO_IMAGE_FLAG, stage=_stage(steps),
                 note=lambda line: steps.console.print(line, highlight=False))
    stream = model.stream(make_generator(model, opts), opts.codec_device)
    if picture is not None:
        with steps.step(f"image {Path(image).name}"):
            stream.set_image(model.vision.encode_image(picture))
    return Opened(bundle, Session(stream, model.vision))


def resolve_bundle(opts: ModelOptions, steps: Steps) -> Path:
    """The bundle directory: --weights, or --hf-repo downloaded and converted once."""
    b = opts.bundle
    return resolve(b.weights, b.hf_repo, b.quantize, stage=_stage(steps),
                   note=lambda line: steps.console.print(line, highlight=False))


def _stage(steps: Steps):
    @contextmanager
    def stage(description: str) -> Iterator[None]:
        # Hugging Face shows its own progress bars while it downloads.
        with steps.step(description, own_output=description.startswith("download")):
            yield

    return stage


def make_generator(model: Loaded, opts: ModelOptions) -> Generator:
    """The generator with the bundle's sampling settings (Kyutai's), overridden by the
    options."""
    return model.generator(opts.generation(model.generation), seed=opts.seed,
                           kv_bits=opts.kv_bits)
