"""One opener for every tool, in the spirit of `mlx_lm.utils.load`: the app, the server,
`moshivis-bench`, `moshivis-eval` and `moshivis-train` all call `load`.

    model = moshivis_mlx.load("moshika-vis-q8")               # a bundle of moshivis-convert
    model = moshivis_mlx.load(hf_repo="kyutai/moshika-vis-pytorch-bf16", quantize="q4")
    stream = model.stream(model.generator(seed=0))

`load` resolves the bundle (a repository or a folder of Kyutai's files is downloaded and
converted once into the cache), reads the adapters before anything heavy (a bad directory
fails at once), loads the language model with the adapters on it, Mimi, the image encoder
and the tokenizer, and checks that they fit together. Every refusal a user can fix is a
`WeightsError` with one line saying what to do, written here once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .bundle import load_generation, load_lm, load_mimi, load_vision, read_config
from .errors import BundleError, UsageError, WeightsError, one_line
from .generate import Generator
from .image import ImageEncoder
from .memory import wire_weights
from .models.lm import LM, LmConfig
from .models.mimi import Mimi
from .quant import QuantSpec, preset_name
from .sampling import GenerationConfig, Sampler
from .stream import Stream, codec_device
from .text import TextTokenizer, find_tokenizer

if TYPE_CHECKING:
    from .adapters import Adapters

DEFAULT_HF_REPO = "kyutai/moshika-vis-pytorch-bf16"
"""Kyutai's MoshiVis (female voice), bf16: what a tool runs on when given no weights."""

Stage = Callable[[str], AbstractContextManager]
"""`stage(description)`: a progress display around one named part of the opening."""


@dataclass(frozen=True)
class BundleOptions:
    """Which model a tool runs on: the options the app, the server, the benchmark, the
    evaluation and training share (their command lines spell them alike)."""

    weights: Path | None = None
    """A bundle directory made by moshivis-convert (overrides `hf_repo`)."""
    hf_repo: str = DEFAULT_HF_REPO
    """A Hugging Face repository (or a folder of its files) downloaded and converted once."""
    quantize: str | None = None
    """The preset ("q8", "q4", "bf16") when converting `hf_repo`; None: not given (q8)."""
    adapters: Path | None = None
    """Fine-tuned adapters (moshivis-train's OUT/adapters) put on the language model."""


@dataclass
class Loaded:
    """A bundle's models, opened and checked together."""

    bundle: Path
    lm: LM
    mimi: Mimi | None
    vision: ImageEncoder | None
    tokenizer: TextTokenizer | None
    generation: GenerationConfig
    """The bundle's sampling defaults (Kyutai's, or what it was converted with)."""
    quantization: str
    """How the weights are stored, for reports: "q8 (8-bit, group 64)", "bf16", ..."""

    def generator(self, generation: GenerationConfig | None = None, seed: int | None = None,
                  greedy: bool = False, kv_bits: int | None = None,
                  batch_size: int = 1) -> Generator:
        """A generator with `generation`'s sampling (default: the bundle's), seeded; greedy
        decoding for both streams if `greedy`."""
        g = generation or self.generation
        if greedy:
            text, audio = Sampler(temperature=0.0), Sampler(temperature=0.0)
        else:
            text, audio = g.text_sampler(seed), g.audio_sampler(seed)
        try:
            return Generator(self.lm, text_sampler=text, audio_sampler=audio,
                             xa_start=g.xa_start, kv_bits=kv_bits, batch_size=batch_size)
        except ValueError as e:  # only kv_bits can make a loaded model's caches impossible
            raise UsageError(f"--kv-bits {kv_bits}: {e}", "leave --kv-bits out") from None

    def stream(self, generator: Generator, codec: str = "default") -> Stream:
        """The real-time frame around `generator`: Mimi (on `codec`: default, cpu or rust)
        and the tokenizer."""
        return Stream(self.mimi, generator, self.tokenizer, codec_device=codec_device(codec))


def load(weights: str | Path | None = None, *, hf_repo: str = DEFAULT_HF_REPO,
         quantize: str | None = None, adapters: str | Path | Adapters | None = None,
         vision: bool | None = True, codec: bool = True, tokenizer: bool = True,
         cross_attention: bool = False, no_vision_flag: str | None = None,
         stage: Stage | None = None, note: Callable[[str], None] | None = None) -> Loaded:
    """Opens `weights` (a bundle), else `hf_repo` converted once at `quantize`.

    `vision`: True loads the image encoder and refuses a bundle without one (or a plain
    Moshi model), None loads it if the bundle has one, False never. `codec`, `tokenizer`:
    load Mimi and the tokenizer. `adapters`: a directory, or adapters already read.
    `cross_attention`: refuse plain Moshi even without the image encoder (training needs
    the adapters). `no_vision_flag` names the caller's option that does without an image,
    for the refusals. `stage(description)` wraps each part (progress); `note(line)` hears
    remarks (an ignored -q, weights close to memory)."""
    from .adapters import apply_adapters, read_adapters

    stage = stage or (lambda description: nullcontext())
    trained = read_adapters(adapters) if isinstance(adapters, (str, Path)) else adapters
    bundle = resolve(weights, hf_repo, quantize, stage=stage, note=note)
    try:
        cfg = read_config(bundle)
    except BundleError as e:
        raise WeightsError(e.message, _fix(bundle)) from None
    if vision and not cfg.get("vision"):
        raise WeightsError(f"{bundle} has no image encoder", _use_moshivis(no_vision_flag))
    try:
        with stage("language model"):
            lm = load_lm(bundle)
            if vision or cross_attention or trained is not None:
                require_cross_attention(lm.cfg, bundle, no_vision_flag)
            if trained is not None:
                apply_adapters(lm, trained, str(bundle))
        mimi = None
        if codec:
            with stage("Mimi codec"):
                mimi = load_mimi(bundle)
        encoder = None
        if vision or (vision is None and cfg.get("vision") and lm.cfg.cross_attention):
            with stage("image encoder"):
                encoder = load_vision(bundle)
        text = None
        if tokenizer:
            with stage("tokenizer"):
                text = TextTokenizer(find_tokenizer(bundle), lm.cfg.text_padding_ids)
        generation = load_generation(bundle)
    except WeightsError as e:  # bundles' and tokenizers' errors too: say what to do
        if e.fix:
            raise
        raise WeightsError(e.message, _fix(bundle)) from None
    except (ValueError, OSError) as e:
        raise WeightsError(f"cannot use the weights in {bundle}: {one_line(e)}",
                           _fix(bundle)) from None
    warning = wire_weights(lm, mimi, encoder.model if encoder is not None else None)
    if warning and note is not None:
        note(f"note: {warning}")
    return Loaded(bundle, lm, mimi, encoder, text, generation, quantization_label(cfg))


def require_cross_attention(cfg: LmConfig, bundle: str | Path,
                            no_vision_flag: str | None = None) -> None:
    """Refuses plain Moshi where an image (or adapters) is needed: the one place it is said."""
    if not cfg.cross_attention:
        raise WeightsError(f"the model in {bundle} is plain Moshi (no cross-attention)",
                           _use_moshivis(no_vision_flag))


def resolve(weights: str | Path | None, hf_repo: str = DEFAULT_HF_REPO,
            quantize: str | None = None, stage: Stage | None = None,
            note: Callable[[str], None] | None = None) -> Path:
    """The bundle directory: `weights` as given, else `hf_repo` downloaded and converted
    once into the cache (Hugging Face shows its own progress bars while downloading)."""
    from .weights_convert.hub import find_bundle

    return find_bundle(weights, hf_repo, quantize, stage=stage, note=note)


def quantization_label(cfg: dict) -> str:
    """"q8 (8-bit, group 64)", or the dtype of an unquantized bundle."""
    spec = QuantSpec.from_dict(cfg.get("quantization"))
    if spec is None:
        return str(cfg.get("dtype", "bf16"))
    return f"{preset_name(spec)} ({spec.bits}-bit, group {spec.group_size})"


def _use_moshivis(no_vision_flag: str | None) -> str:
    return "use a MoshiVis bundle" + (f", or run with {no_vision_flag}" if no_vision_flag else "")


def _fix(bundle: Path) -> str:
    """What to do about a bundle that cannot be used: one converted into the cache is
    removed (the next run converts it again); one of the user's is converted again."""
    from .weights_convert.hub import cache_root

    if Path(bundle).resolve().parent == cache_root().resolve():
        return f"remove {bundle} and run again: it is converted anew"
    return "convert them again with moshivis-convert, or use --hf-repo"
