"""What the moshivis-train tests build: a tiny MoshiVis bundle for a tiny task, the task's
pictures and manifests, and speech samples in moshi-finetune's layout.

The task: a picture of one coloured shape (a disc, a square or a triangle, of any size,
anywhere), the question "what colour is the shape?", the answer one colour word. The
bundle's tokenizer knows only the task's words, one piece each, and the language model's
text vocabulary is exactly that: the answer is one token, right after the question.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 205, 20)}
QUESTION = "what colour is the shape?"
SHAPES = ("disc", "square", "triangle")


def task_tokenizer() -> bytes:
    """A SentencePiece word model holding the task's words (and Moshi's special ids 0-3)."""
    import sentencepiece as spm

    lines = [f"{QUESTION} {c}" for c in COLOURS] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=len(COLOURS) + 9,
        model_type="word", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return model.getvalue()


def build_task_bundle(out: Path, seed: int = 0, text_card: int | None = None,
                      teach_steps: int = 0, audio_scale: float = 1.0,
                      teach_lr: float = 1e-2) -> Path:
    """A tiny MoshiVis bundle (random frozen backbone, random SigLIP and Mimi) whose text
    vocabulary is the task tokenizer's; the gates start closed (their last layer zero),
    so the untrained model is plain Moshi up to sigmoid(-4); the image counts from step 0."""
    import sentencepiece as spm
    from mlx.utils import tree_flatten

    from moshivis_mlx.app.demo import _random_mimi
    from moshivis_mlx.bundle import read_config, save_lm, write_config
    from moshivis_mlx.models.lm import LM, tiny
    from moshivis_mlx.models.siglip import SiglipVision
    from moshivis_mlx.models.siglip import tiny as siglip_tiny
    from moshivis_mlx.sampling import GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = task_tokenizer()
    cfg = tiny(cross_attention=True)
    cfg.text_card = text_card or spm.SentencePieceProcessor(model_proto=tok).get_piece_size()
    mimi, mimi_cfg = _random_mimi(seed + 1)
    # No biases: silence is exactly silent (one code, every frame, streaming or not), as
    # it nearly is for the real Mimi once it has settled.
    mimi.load_weights([(k, mx.zeros_like(v)) for k, v in tree_flatten(mimi.parameters())
                       if k.endswith("bias")], strict=False)
    mx.save_safetensors(str(out / "mimi.safetensors"), dict(tree_flatten(mimi.parameters())))
    silence = np.asarray(mimi.encode(np.zeros(1920, dtype=np.float32)))[:, 0]
    mx.random.seed(seed)
    lm = LM(cfg)
    for layer in lm.transformer.layers:
        layer.xa_gate.linear_out.weight = mx.zeros_like(layer.xa_gate.linear_out.weight)
    for table in lm.audio_emb:
        table.weight = table.weight * audio_scale
    mx.eval(lm.parameters())
    if teach_steps:
        teach_text(lm, tok, silence, teach_steps, seed, teach_lr)
    save_lm(lm, out, extra_config={"generation": GenerationConfig(xa_start=0).to_dict()})
    mx.random.seed(seed + 2)
    vision_cfg = siglip_tiny()
    vision = SiglipVision(vision_cfg)
    mx.eval(vision.parameters())
    mx.save_safetensors(str(out / "vision.safetensors"), dict(tree_flatten(vision.parameters())))
    (out / "tokenizer.model").write_bytes(tok)
    c = read_config(out)
    c.pop("format_version", None)
    c["mimi"] = mimi_cfg.to_dict()
    c["vision"] = {"siglip": vision_cfg.to_dict(), "dtype": "float32", "quantization": None}
    write_config(out, c)
    return out


def teach_text(lm, tokenizer: bytes, silence: np.ndarray, steps: int, seed: int,
               lr: float = 1e-2) -> None:
    """Teaches the backbone the task's text (both audio streams silent), without images:
    afterwards it says the question, then guesses a colour (it cannot see), as Moshi knows
    the language but not the picture. The adapters take no part (no image: no
    cross-attention)."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    import sentencepiece as spm

    from moshivis_mlx.adapters import is_adapter

    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lm.unfreeze()
    for path, module in lm.named_modules():
        if is_adapter(path):
            module.freeze()
    q = sp.encode(QUESTION)
    opt = optim.Adam(learning_rate=lr)

    def loss_fn(model, codes):
        out = model.forward(codes, audio_codebooks=0)
        return nn.losses.cross_entropy(out.text_logits[:, 0], codes[:, 0]).mean()

    step = nn.value_and_grad(lm, loss_fn)
    for _ in range(steps):
        codes = np.empty((16, 17, len(q) + 1), dtype=np.int32)
        codes[:, 1:] = np.tile(silence, 2)[None, :, None]
        for row in codes:
            row[0] = q + sp.encode(names[int(rng.integers(len(names)))])
        _, grads = step(lm, mx.array(codes))
        opt.update(lm, grads)
        mx.eval(lm.parameters(), opt.state)
    lm.unfreeze()


def picture(colour: str, rng: np.random.Generator, size: int = 56, lo: int = 18, hi: int = 38
            ) -> Image.Image:
    """One shape of `colour` on a light grey background, of random kind, size and place."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    s = int(rng.integers(lo, hi))
    x, y = (int(v) for v in rng.integers(0, size - s, 2))
    box = [x, y, x + s, y + s]
    fill = COLOURS[colour]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
    return img


def write_task(root: Path, n: int, name: str, seed: int, **shape) -> tuple[Path, list[str]]:
    """`n` pictures (the colours in turn) and a speechless manifest asking about each;
    returns the manifest and the colours."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    colours = [names[i % len(names)] for i in range(n)]
    lines = []
    for i, colour in enumerate(colours):
        image = f"images/{name}-{i:03d}.png"
        picture(colour, rng, **shape).save(root / image)
        lines.append(json.dumps({"image": image, "turns": [
            {"role": "user", "text": QUESTION}, {"role": "assistant", "text": colour}]}))
    manifest = root / f"{name}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, colours


def write_dialogue(root: Path, name: str, seconds: float, words: list[tuple[str, float, float]],
                   seed: int = 0, rate: int = 24000, channels: int = 2) -> tuple[Path, Path]:
    """A stereo WAV (noise bursts on both channels) and its alignment JSON in
    moshi-finetune's layout: [word, [start, end], "SPEAKER_MAIN"]."""
    from moshivis_mlx.wav import write_wav

    rng = np.random.default_rng(seed)
    pcm = 0.1 * rng.standard_normal((int(seconds * rate), channels)).astype(np.float32)
    wav = Path(root) / f"{name}.wav"
    write_wav(wav, pcm, rate)
    alignment = Path(root) / f"{name}.json"
    alignment.write_text(json.dumps({"alignments": [[w, [s, e], "SPEAKER_MAIN"]
                                                    for w, s, e in words]}))
    return wav, alignment
