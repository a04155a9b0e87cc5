"""From the command line to ready models: find (or download and convert) the bundle,
load the language model, Mimi, the image encoder and the tokenizer, with progress.

Every failure a user can fix becomes a `WeightsError` / `ImageError` with a one-line
message saying what to do.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightsError
from ..progress import Steps


def resolve_bundle(args: argparse.Namespace, steps: Steps) -> Path:
    """The bundle directory: --weights, or --hf-repo downloaded and converted once."""
    if args.weights is not None:
        if args.quantize is not None:
            steps.console.print(f"note: -q {args.quantize} is ignored: the bundle in "
                                f"{args.weights} is used as it was converted", highlight=False)
        path = Path(args.weights).expanduser()
        if not path.exists():
            raise WeightsError(f"weights directory {path} does not exist",
                               "give a bundle made by moshivis-convert with --weights DIR, "
                               "or leave --weights out to download Kyutai's model")
        return path
    from moshivis_mlx.weights_convert.hub import HubError, bundle_for_repo

    @contextmanager
    def stage(description: str) -> Iterator[None]:
        # Hugging Face shows its own progress bars while it downloads.
        with steps.step(description, own_output=description.startswith("download")):
            yield

    try:
        return bundle_for_repo(args.hf_repo, args.quantize or "8", stage=stage)
    except HubError as e:
        raise WeightsError(str(e)) from None


@dataclass
class Models:
    bundle: Path
    lm: Any
    mimi: Any
    vision: Any | None
    tokenizer: Any
    generation: Any


def _bundle_error(e: Exception, bundle: Path) -> WeightsError:
    return WeightsError(f"cannot use the weights in {bundle}: {' '.join(str(e).split())}",
                        "convert them again with moshivis-convert, or use --hf-repo")


def load_models(bundle: Path, want_vision: bool, steps: Steps) -> Models:
    from .. import load_lm, load_mimi
    from ..bundle import load_generation, read_config
    from ..errors import BundleError
    from ..text import TextTokenizer, TokenizerError, find_tokenizer

    try:
        cfg = read_config(bundle)
    except BundleError as e:
        raise WeightsError(str(e)) from None
    try:
        with steps.step("language model"):
            lm = load_lm(bundle)
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
            from ..bundle import load_vision

            with steps.step("image encoder"):
                vision = load_vision(bundle)
        with steps.step("tokenizer"):
            tokenizer = TextTokenizer(find_tokenizer(bundle), lm.cfg.text_padding_ids)
    except (BundleError, TokenizerError, ValueError, OSError) as e:
        if isinstance(e, WeightsError):
            raise
        raise _bundle_error(e, bundle) from None
    return Models(bundle, lm, mimi, vision, tokenizer, load_generation(bundle))


def make_generator(models: Models, args: argparse.Namespace):
    """The generator with Kyutai's sampling defaults (from the bundle), overridden by the
    command line."""
    from dataclasses import replace

    from .. import Generator

    g = models.generation
    over = {"text_temperature": args.text_temperature, "audio_temperature": args.audio_temperature,
            "text_top_k": args.top_k, "audio_top_k": args.top_k, "text_top_p": args.top_p,
            "audio_top_p": args.top_p, "xa_start": args.xa_start}
    g = replace(g, **{k: v for k, v in over.items() if v is not None})
    return Generator(models.lm, text_sampler=g.text_sampler(args.seed),
                     audio_sampler=g.audio_sampler(args.seed), xa_start=g.xa_start)


def load_picture(path: str | Path):
    """An image file -> a decoded RGB picture (PIL); ImageError with a one-line
    message for anything that is not a usable image."""
    from ..image import ImageError, load_image

    try:
        return load_image(path)
    except ImageError as e:
        raise ImageError(str(e), "give a JPEG or PNG photo") from None


def image_encoder(models: Models):
    """path -> (image tokens, decoded picture)."""

    def encode(path: str):
        picture = load_picture(path)
        return models.vision.encode_image(picture), picture

    return encode
