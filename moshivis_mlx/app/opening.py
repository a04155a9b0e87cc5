"""The opening sequence, the same for live mode, file mode and the demo: find (or download
and convert once) the bundle, load the language model, Mimi, the image encoder when
wanted and the tokenizer, build the generator and the stream, set the first image, and
make the session around it.

Every failure a user can fix becomes a `WeightsError` with a one-line message saying
what to do. The first image is decoded by the caller (`session.load_picture`) before any
of this: a bad file should not wait for a 7B model to load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import apply_adapters, read_adapters
from ..bundle import load_generation, load_lm, load_mimi, load_vision, read_config
from ..errors import BundleError, TokenizerError, UsageError, WeightsError, one_line
from ..generate import Generator
from ..image import ImageEncoder
from ..memory import wire_weights
from ..models.lm import LM
from ..models.mimi import Mimi
from ..progress import Steps
from ..sampling import GenerationConfig
from ..session import Session
from ..stream import Stream, codec_device
from ..text import TextTokenizer, find_tokenizer
from .options import ModelOptions


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
    lm, mimi, vision, tokenizer = load_models(bundle, want_vision, steps, opts.adapters)
    warning = wire_weights(lm, mimi, vision.model if vision is not None else None)
    if warning:
        steps.console.print(f"note: {warning}", highlight=False)
    stream = Stream(mimi, make_generator(lm, opts, load_generation(bundle)), tokenizer,
                    codec_device=codec_device(opts.codec_device))
    if picture is not None:
        with steps.step(f"image {Path(image).name}"):
            stream.set_image(vision.encode_image(picture))
    return Opened(bundle, Session(stream, vision))


def resolve_bundle(opts: ModelOptions, steps: Steps) -> Path:
    """The bundle directory: --weights, or --hf-repo downloaded and converted once."""
    from moshivis_mlx.weights_convert.hub import find_bundle

    @contextmanager
    def stage(description: str) -> Iterator[None]:
        # Hugging Face shows its own progress bars while it downloads.
        with steps.step(description, own_output=description.startswith("download")):
            yield

    return find_bundle(opts.weights, opts.hf_repo, opts.quantize, stage=stage,
                       note=lambda line: steps.console.print(line, highlight=False))


def _bundle_error(e: Exception, bundle: Path) -> WeightsError:
    return WeightsError(f"cannot use the weights in {bundle}: {one_line(e)}", _fix(bundle))


def _fix(bundle: Path) -> str:
    """What to do about a bundle that cannot be used: one the app converted into its
    cache is removed (the next run converts again); one of the user's is converted again."""
    from moshivis_mlx.weights_convert.hub import cache_root

    if Path(bundle).resolve().parent == cache_root().resolve():
        return f"remove {bundle} and run again: it is converted anew"
    return "convert them again with moshivis-convert, or use --hf-repo"


def load_models(bundle: Path, want_vision: bool, steps: Steps, adapters: Path | None = None
                ) -> tuple[LM, Mimi, ImageEncoder | None, TextTokenizer]:
    """The bundle's language model (with `adapters` on it), Mimi, image encoder (if
    wanted) and tokenizer."""
    try:
        cfg = read_config(bundle)
    except BundleError as e:
        raise WeightsError(str(e), _fix(bundle)) from None
    trained = read_adapters(adapters) if adapters is not None else None
    try:
        with steps.step("language model"):
            lm = load_lm(bundle)
            if trained is not None:
                apply_adapters(lm, trained, str(bundle))
        with steps.step("Mimi codec"):
            mimi = load_mimi(bundle)
        vision = None
        if want_vision:
            if not cfg.get("vision"):
                raise WeightsError(f"{bundle} has no image encoder",
                                   "use a MoshiVis bundle, or run with --no-image")
            if not lm.cfg.cross_attention:
                raise WeightsError(f"the model in {bundle} is plain Moshi (no cross-attention)",
                                   "use a MoshiVis bundle, or run with --no-image")
            with steps.step("image encoder"):
                vision = load_vision(bundle)
        with steps.step("tokenizer"):
            tokenizer = TextTokenizer(find_tokenizer(bundle), lm.cfg.text_padding_ids)
    except (BundleError, TokenizerError, ValueError, OSError) as e:
        if isinstance(e, WeightsError):
            raise WeightsError(e.message, e.fix or _fix(bundle)) from None
        raise _bundle_error(e, bundle) from None
    return lm, mimi, vision, tokenizer


def make_generator(lm: LM, opts: ModelOptions, defaults: GenerationConfig) -> Generator:
    """The generator with the bundle's sampling settings (Kyutai's), overridden by the
    options."""
    g = opts.generation(defaults)
    try:
        return Generator(lm, text_sampler=g.text_sampler(opts.seed),
                         audio_sampler=g.audio_sampler(opts.seed), xa_start=g.xa_start,
                         kv_bits=opts.kv_bits)
    except ValueError as e:  # only --kv-bits can make a loaded model's caches impossible
        raise UsageError(f"--kv-bits {opts.kv_bits}: {e}", "leave --kv-bits out") from None
