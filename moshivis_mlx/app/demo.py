"""The offline demo: the whole pipeline on a tiny random-weight model, no download.

On first use a tiny bundle is generated deterministically into the cache (a few MB): the
tiny MoshiVis language model, a tiny Mimi, a tiny SigLIP tower, and a SentencePiece
tokenizer trained on the spot with exactly the language model's text vocabulary. Then
file mode runs the sample question (spoken by espeak-ng) about the sample picture that
ship with the package. The weights are random, so the answer is noise: the demo shows
that everything runs, end to end, on this machine.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from ..fileio import staged_dir, sweep
from .options import AppOptions

ASSETS = Path(__file__).parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample.jpg"
SAMPLE_SPEECH = ASSETS / "question.wav"
DEMO_OUTPUT = Path("moshivis-demo")
DEMO_ANSWER_SECONDS = 4.0
"""The demo's cap on the answer after the question: random weights never fall silent."""
DEMO_VERSION = 1
"""Bump when the demo bundle's recipe changes: a new cache directory is generated."""

TOKENIZER_TEXT = """\
What do you see in this picture?
I see a small red house under a blue sky, with a yellow sun and green hills.
There is a tree next to the house, and a path leading to the door.
The sky is clear and the light is warm, it looks like a summer afternoon.
Can you tell me more about the colours of the image?
The roof is dark red, the walls are white, and the grass is bright green.
Where is the sun? The sun is in the top right corner of the picture.
How many windows does the house have? It has two windows and one door.
This is a drawing, not a photograph: the shapes are simple and flat.
Thank you, that was a very good description of the scene.
"""


def train_tokenizer(vocab_size: int) -> bytes:
    """A SentencePiece model with exactly `vocab_size` pieces and Moshi's special ids
    (0 unknown, 1 begin, 2 end, 3 padding)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
        hard_vocab_limit=True)
    return model.getvalue()


def _random_mimi(seed: int):
    """Tiny Mimi with every weight random at a sensible scale (a freshly built one has
    empty codebooks and would only ever decode silence)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from ..models.mimi import Mimi, MimiConfig

    cfg = MimiConfig.tiny()
    mimi = Mimi(cfg)
    rng = np.random.default_rng(seed)
    params = {}
    for name, p in tree_flatten(mimi.parameters()):
        shape = p.shape
        if "norm" in name:
            a = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        elif "layer_scale" in name or name.endswith(".scale"):
            a = 0.3 + 0.4 * rng.random(shape)
        elif name.endswith("bias"):
            a = 0.02 * rng.standard_normal(shape)
        elif "embedding" in name:  # codebooks: centroids at the latents' scale
            a = rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        params[name] = mx.array(a.astype(np.float32))
    mimi.update(tree_unflatten(list(params.items())))
    mx.eval(mimi.parameters())
    return mimi, cfg


def build_demo_bundle(out: Path, seed: int = 0) -> Path:
    """Writes the tiny demo bundle into `out` (replaced if present)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..bundle import read_config, save_lm, write_config
    from ..models.lm import LM, tiny
    from ..models.siglip import SiglipVision
    from ..models.siglip import tiny as siglip_tiny
    from ..sampling import GenerationConfig

    with staged_dir(out) as tmp:  # built aside, renamed when complete, removed if stopped
        mx.random.seed(seed)
        lm = LM(tiny(cross_attention=True))
        mx.eval(lm.parameters())
        # Kyutai's sampling; the image counts from step 2 (the demo question is short).
        generation = GenerationConfig(xa_start=2)
        save_lm(lm, tmp, extra_config={"generation": generation.to_dict()})

        mimi, mimi_cfg = _random_mimi(seed + 1)
        mx.save_safetensors(str(tmp / "mimi.safetensors"), dict(tree_flatten(mimi.parameters())))

        mx.random.seed(seed + 2)
        vision_cfg = siglip_tiny()
        vision = SiglipVision(vision_cfg)
        mx.eval(vision.parameters())
        mx.save_safetensors(str(tmp / "vision.safetensors"),
                            dict(tree_flatten(vision.parameters())))

        (tmp / "tokenizer.model").write_bytes(train_tokenizer(lm.cfg.text_card))

        cfg = read_config(tmp)
        cfg.pop("format_version", None)
        cfg["mimi"] = mimi_cfg.to_dict()
        cfg["vision"] = {"siglip": vision_cfg.to_dict(), "dtype": "float32",
                         "quantization": None}
        cfg["source"] = {"demo": f"tiny random weights, seed {seed}, recipe v{DEMO_VERSION}"}
        write_config(tmp, cfg)
    return Path(out)


def demo_bundle(root: Path | None = None) -> tuple[Path, bool]:
    """The cached demo bundle (generated if missing); and whether it was just made."""
    from moshivis_mlx.weights_convert.hub import cache_root

    sweep(root or cache_root())  # what a killed run left behind
    path = (root or cache_root()) / f"demo-tiny-v{DEMO_VERSION}"
    if (path / "config.json").exists():
        try:  # a few MB: loading is the surest check that this version can read it
            from ..bundle import load_lm, load_mimi, load_vision

            load_lm(path), load_mimi(path), load_vision(path)
            return path, False
        except Exception:  # made by an older version, or damaged: make it again
            pass
    return build_demo_bundle(path), True


def run_demo(opts: AppOptions, console: Console) -> int:
    from .files import run_file

    console.print("[bold]moshivis-mlx offline demo[/]: the real pipeline (Mimi -> MoshiVis -> "
                  "Mimi, file mode) on a [bold]tiny model with random weights[/].")
    with console.status("preparing the tiny demo model (first run only) ..."):
        bundle, made = demo_bundle()
    console.print(f"{'made' if made else 'using'} the demo model: {bundle}", highlight=False)
    DEMO_OUTPUT.mkdir(exist_ok=True)
    seed = opts.model.seed if opts.model.seed is not None else 0
    model = replace(opts.model.on_weights(bundle), seed=seed)
    opts = replace(
        opts, model=model,
        image=opts.image or str(SAMPLE_IMAGE), input_wav=opts.input_wav or str(SAMPLE_SPEECH),
        output_wav=opts.output_wav or DEMO_OUTPUT / "answer.wav",
        transcript=opts.transcript or DEMO_OUTPUT / "transcript.json",
        max_answer_seconds=min(opts.max_answer_seconds, DEMO_ANSWER_SECONDS))
    console.print(f"question: {opts.input_wav}\nimage:    {opts.image}", highlight=False)
    code = run_file(opts, console)
    console.print(f"\noutputs in {opts.output_wav.parent}/: the model's audio "
                  f"({opts.output_wav.name}) and its words with gate values "
                  f"({opts.transcript.name}).", highlight=False)
    console.print("[yellow]The weights are random, so the answer is noise[/]: this shows the "
                  "pipeline runs end to end. For the real model, on a Mac: "
                  "[bold]moshivis-mlx --image photo.jpg[/]")
    return code
