"""Streaming generation: one 80 ms frame in, one frame of the model's voice and text out.

`Generator` follows the conventions of Kyutai's PyTorch `LMGen` exactly:

* 17 streams: row 0 text, rows 1..8 the model's codebooks, rows 9..16 the user's.
* At step s a row with delay d gets its initial token while s <= d. Otherwise model rows
  get what the model generated at step s-1, and user rows the codes given at step s-d.
* Step s yields nothing at s = 0 (the acoustic delay); afterwards the tokens generated
  at step s - max_delay + d for each model row, so the 8 codes form one frame again.

A conversation has no step limit: the temporal transformer's cache is a ring buffer of
its window, the token history holds `max_delay + 1` frames, and nothing else grows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .models.lm import LM
from .models.transformer import CrossAttentionInput
from .sampling import Sampler, kyutai_audio_sampler, kyutai_text_sampler

DEFAULT_XA_START = 16


@dataclass
class StepOutput:
    """One frame of the model's output, its delays undone."""

    text_token: int
    audio_codes: list[int]
    gate: float | None
    """Mean cross-attention gate of the step that produced `text_token` (None: no image)."""


class Generator:
    """Drives an `LM` one frame at a time.

    gen = Generator(lm, text_sampler=Sampler(temperature=0.0),
                    audio_sampler=Sampler(temperature=0.0))
    gen.set_image(siglip_tokens)    # once per image; None removes it
    out = gen.step(user_codes)      # the user's 8 Mimi codes of this frame
    """

    def __init__(
        self,
        lm: LM,
        text_sampler: Sampler | None = None,
        audio_sampler: Sampler | None = None,
        xa_start: int = DEFAULT_XA_START,
        keep_logits: bool = False,
        compiled: bool = True,
    ):
        self.lm = lm
        cfg = lm.cfg
        self.text_sampler = text_sampler or kyutai_text_sampler()
        self.audio_sampler = audio_sampler or kyutai_audio_sampler()
        self.xa_start = xa_start
        self.keep_logits = keep_logits
        self.compiled = compiled
        """Compile the step (fixed shapes: one trace serves the whole conversation)."""
        self.gate_override: float | None = None
        """Replace every cross-attention gate by this constant (research: 0.0 removes the image)."""

        self.num_model_rows = 1 + cfg.dep_q
        self.num_user_codes = cfg.n_q - cfg.dep_q
        self.delays = list(cfg.delays)
        self.max_delay = max(self.delays)
        initial = [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q
        self._initial = np.array(initial, dtype=np.int32)
        self._initial_model = mx.array(self._initial[: self.num_model_rows])

        self.caches = lm.make_cache()
        self._step_fns: dict[tuple, Callable[..., list[mx.array]]] = {}
        self.image_kv: tuple[mx.array, mx.array] | None = None
        self.last_text_logits: mx.array | None = None
        self.last_audio_logits: mx.array | None = None
        self.last_tokens: list[int] = []
        self._epoch = 0
        """Counts resets: a step submitted before a reset can no longer be collected."""
        self.reset()

    # -- state ---------------------------------------------------------------------------

    @property
    def step_index(self) -> int:
        """Steps taken since the last reset."""
        return self._step

    def reset(self) -> None:
        """Start a new conversation (the image, if any, is kept)."""
        for c in self.caches:
            c.reset()
        self._step = 0
        self._epoch += 1
        self._pending: deque[PendingStep] = deque()
        keep = self.max_delay + 1
        self._prev_generated: mx.array | None = None
        self._generated: deque[list[int]] = deque(maxlen=keep)
        self._gates: deque[float | None] = deque(maxlen=keep)
        self._user: deque[np.ndarray] = deque(maxlen=keep)
        self.text_sampler.reset()
        self.audio_sampler.reset()

    def set_image(self, tokens: mx.array | np.ndarray | None, reset: bool = False) -> None:
        """Condition on an image: SigLIP tokens [N, D] or [1, N, D]; None for no image.

        The cross-attention keys and values are computed here, once per image. With
        `reset` the conversation restarts, otherwise it goes on with the new image.
        """
        if tokens is None:
            self.image_kv = None
        else:
            tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
            if tokens.ndim == 2:
                tokens = tokens[None]
            if tokens.ndim != 3 or tokens.shape[0] != 1:
                raise ValueError(f"image tokens must be [N, D] or [1, N, D], got {tokens.shape}")
            if tokens.shape[-1] != self.lm.cfg.image_dim:
                raise ValueError(
                    f"image tokens have width {tokens.shape[-1]}, the model expects "
                    f"{self.lm.cfg.image_dim}")
            keys, values = self.lm.image_kv(tokens)
            mx.eval(keys, values)
            self.image_kv = (keys, values)
        if reset:
            self.reset()

    def warm_up(self, steps: int = 2, image_tokens: int | None = None) -> None:
        """Runs once each variant of the step a conversation will use, so none compiles
        mid-conversation: the step without the image and, for MoshiVis, the step with an
        image of `image_tokens` tokens (default: the current image's). Then starts afresh.
        """
        image_kv, xa_start = self.image_kv, self.xa_start
        silence = np.zeros(self.num_user_codes, dtype=np.int32)
        try:
            self.image_kv = None
            for _ in range(steps):
                self.step(silence)
            if image_kv is not None:
                image_tokens = image_kv[0].shape[2]
            if self.lm.cfg.cross_attention and image_tokens:
                if image_kv is None:
                    self.set_image(mx.zeros((image_tokens, self.lm.cfg.image_dim)))
                else:
                    self.image_kv = image_kv
                self.xa_start = 0
                for _ in range(steps):
                    self.step(silence)
        finally:
            self.image_kv, self.xa_start = image_kv, xa_start
            self.reset()

    # -- one step --------------------------------------------------------------------------

    def _check_codes(self, user_codes: Sequence[int] | np.ndarray | mx.array) -> np.ndarray:
        codes = np.asarray(user_codes).reshape(-1)
        if codes.size < self.num_user_codes:
            raise ValueError(f"expected {self.num_user_codes} user codes, got {codes.size}")
        codes = codes[: self.num_user_codes]
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"user codes must be integers, got {codes.dtype}")
        card = self.lm.cfg.card
        if codes.min() < -1 or codes.max() >= card:
            raise ValueError(f"user codes must be in [0, {card}) (or -1 for a zero embedding)")
        return codes.astype(np.int32)

    def _input_tokens(self) -> mx.array:
        """The [1, 17, 1] input column of the current step."""
        s = self._step
        d = self.delays
        n = self.num_model_rows
        model_init = [s <= d[r] for r in range(n)]
        if self._prev_generated is None or all(model_init):
            model = self._initial_model
        elif any(model_init):
            model = mx.where(mx.array(model_init), self._initial_model, self._prev_generated)
        else:
            model = self._prev_generated
        user = np.empty(self.num_user_codes, dtype=np.int32)
        for i in range(self.num_user_codes):
            r = n + i
            user[i] = self._initial[r] if s <= d[r] else self._user[-1 - d[r]][i]
        tokens = mx.concatenate([model, mx.array(user)])
        return tokens.reshape(1, -1, 1)

    def step(
        self,
        user_codes: Sequence[int] | np.ndarray | mx.array,
        force_text: int | None = None,
        force_audio: Sequence[int] | None = None,
    ) -> StepOutput | None:
        """Feed the user's codes of one frame; returns the model's frame (None at step 0).

        `force_text` / `force_audio` replace the sampled tokens of this step (teacher
        forcing, e.g. to score a given transcript); the logits are computed as usual.
        """
        return self.step_async(user_codes, force_text, force_audio).result()

    def step_async(
        self,
        user_codes: Sequence[int] | np.ndarray | mx.array,
        force_text: int | None = None,
        force_audio: Sequence[int] | None = None,
    ) -> PendingStep:
        """Submits a step and returns at once; `.result()` waits for its output.

        The step's graph only depends on the previous step's tokens as arrays, so a
        caller holding the next frame's codes can submit it before collecting this one:
        building step n+1 on the host overlaps with computing step n on the device.
        """
        self._user.append(self._check_codes(user_codes))
        cross = self.image_kv is not None and self._step >= self.xa_start
        forced = force_text is not None or force_audio is not None
        forced_tokens = None
        if forced:
            if force_text is None or force_audio is None or len(force_audio) != self.lm.cfg.dep_q:
                raise ValueError(
                    f"teacher forcing needs the text token and {self.lm.cfg.dep_q} codes")
            forced_tokens = mx.array([force_text, *force_audio], dtype=mx.int32)

        outputs = self._step_fn(cross, forced)(
            self._input_tokens(),
            mx.array(self._step, dtype=mx.int32),
            self.text_sampler.next_key(),
            self.audio_sampler.next_key(),
            self.image_kv if cross else None,
            forced_tokens,
        )
        mx.async_eval(outputs)  # the one evaluation of the step
        for c in self.caches:
            c.offset += 1
        self._prev_generated = outputs[0]
        pending = PendingStep(self, self._step, outputs, cross, self._epoch)
        self._pending.append(pending)
        self._step += 1
        return pending

    def _collect(self, upto: PendingStep) -> None:
        """Materialises submitted steps in order, up to and including `upto`."""
        while self._pending and upto.output is _NOT_READY:
            p = self._pending.popleft()
            mx.eval(p.outputs)
            tokens = p.outputs[0].tolist()
            self.last_tokens = tokens
            """Text token and codes generated at the last collected step, delays not undone."""
            if self.keep_logits:
                self.last_text_logits, self.last_audio_logits = p.outputs[2], p.outputs[3]
            self._generated.append(tokens)
            self._gates.append(p.outputs[1].item() if p.cross else None)
            p.output = self._output(p.index)
            p.outputs = []

    def _step_fn(self, cross: bool, forced: bool) -> Callable[..., list[mx.array]]:
        """The step function of this variant, compiled once and kept.

        Everything that changes the traced graph is part of the key; the position, the
        random keys, the tokens and the image are array inputs, so one compiled function
        serves every step of a conversation.
        """
        key = (cross, forced, self.keep_logits, self.gate_override, self.compiled,
               self.text_sampler.settings, self.audio_sampler.settings)
        fn = self._step_fns.get(key)
        if fn is None:
            fn = self._make_step_fn(cross, forced)
            if self.compiled:
                state = [c.state for c in self.caches]
                fn = mx.compile(fn, inputs=state, outputs=state)
            self._step_fns[key] = fn
        return fn

    def _make_step_fn(self, cross: bool, forced: bool) -> Callable[..., list[mx.array]]:
        lm, caches = self.lm, self.caches
        text_sampler, audio_sampler = self.text_sampler, self.audio_sampler
        keep_logits, gate_override = self.keep_logits, self.gate_override
        dep_q = lm.cfg.dep_q

        def step(tokens, pos, text_key, audio_key, image, forced_tokens):
            xa = CrossAttentionInput(lm.xa, *image, force_gate=gate_override) if cross else None
            h, text_logits = lm.forward_text(tokens, caches, xa, pos)
            text_logits = text_logits[:, 0]
            if forced:
                text = forced_tokens[:1]
                codes = iter(forced_tokens[1:, None])
                sample = lambda logits: next(codes)  # noqa: E731
            else:
                text = text_sampler.sample(text_logits, text_key)
                keys = iter(mx.random.split(audio_key, dep_q))
                sample = lambda logits: audio_sampler.sample(logits, next(keys))  # noqa: E731
            depformer_caches = lm.depformer.make_cache(lm.dtype)
            audio, audio_logits = lm.depformer(h, text, sample, depformer_caches)
            generated = mx.concatenate([text[:, None], audio], axis=1)[0].astype(mx.int32)
            gate = mx.mean(mx.stack(xa.gates)) if cross else mx.zeros(())
            outputs = [generated, gate]
            if keep_logits:
                outputs += [text_logits[0], mx.stack(audio_logits, axis=1)[0]]
            return outputs

        return step

    def _output(self, s: int) -> StepOutput | None:
        """The model frame of step s, from the generated history (s is the newest entry)."""
        if s < self.max_delay:
            return None
        # Token of model row r generated at step s - max_delay + d[r].
        rows = [self._generated[-1 - self.max_delay + self.delays[r]][r]
                for r in range(self.num_model_rows)]
        gate = self._gates[-1 - self.max_delay + self.delays[0]]
        return StepOutput(text_token=rows[0], audio_codes=rows[1:], gate=gate)


_NOT_READY = object()


class PendingStep:
    """A submitted step of a `Generator`; `result()` waits for its output.

    Steps are collected in the order they were submitted, whichever handle asks first.
    """

    def __init__(self, gen: Generator, index: int, outputs: list[mx.array], cross: bool,
                 epoch: int):
        self._gen = gen
        self.index = index
        self.outputs = outputs
        self.cross = cross
        self.epoch = epoch
        self.output: object = _NOT_READY

    def result(self) -> StepOutput | None:
        if self.output is _NOT_READY:
            if self.epoch != self._gen._epoch:
                raise RuntimeError("this step was submitted before the generator was reset")
            self._gen._collect(self)
        return self.output  # type: ignore[return-value]
