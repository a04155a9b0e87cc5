"""Streaming generation: one 80 ms frame in, one frame of the model's voice and text out.

`Generator` follows the conventions of Kyutai's PyTorch `LMGen` exactly:

* 17 streams: row 0 text, rows 1..8 the model's codebooks, rows 9..16 the user's.
* At step s a row with delay d gets its initial token while s <= d. Otherwise model rows
  get what the model generated at step s-1, and user rows the codes given at step s-d.
* Step s yields nothing at s = 0 (the acoustic delay); afterwards the tokens generated
  at step s - max_delay + d for each model row, so the 8 codes form one frame again.

The state of a conversation is explicit and lives on the device: the caches (keys, values
and their position, all arrays), and the last `max_delay + 1` frames of generated tokens,
user codes and gates. The host only counts steps. So a step is one compiled function of
arrays, a caller can chain frames without reading anything back (`step_async`), and a
batch of B independent conversations steps together (`batch_size`).

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
from .sampling import KYUTAI_GENERATION, Sampler

DEFAULT_XA_START = KYUTAI_GENERATION.xa_start
SPAN_STEP = 256
"""Before the attention window is full a step reads the cache's written slots only, rounded
up to a multiple of this (as mlx-lm grows its caches 256 positions at a time): a dozen
compiled variants for the 7B's 3000 positions, all compiled by `warm_up`."""

Codes = Sequence[int] | np.ndarray | mx.array


@dataclass(eq=False)
class StepOutput:
    """One frame of the model's output, its delays undone, for each conversation of the
    batch."""

    text: np.ndarray
    """[B] the text tokens."""
    audio: np.ndarray
    """[B, dep_q] the model's Mimi codes."""
    gates: np.ndarray | None
    """[B] the mean cross-attention gate of the step that produced the text token (None:
    the image was not attended to)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepOutput):
            return NotImplemented
        same_gates = (self.gates is None) == (other.gates is None) and (
            self.gates is None or np.array_equal(self.gates, other.gates))
        return (np.array_equal(self.text, other.text)
                and np.array_equal(self.audio, other.audio) and same_gates)

    def _single(self) -> None:
        if len(self.text) != 1:
            raise ValueError(f"a batch of {len(self.text)}: use .text, .audio and .gates")

    @property
    def text_token(self) -> int:
        self._single()
        return int(self.text[0])

    @property
    def audio_codes(self) -> list[int]:
        self._single()
        return self.audio[0].tolist()

    @property
    def gate(self) -> float | None:
        self._single()
        return None if self.gates is None else float(self.gates[0])


class Generator:
    """Drives an `LM` one frame at a time.

    gen = Generator(lm, text_sampler=Sampler(temperature=0.0),
                    audio_sampler=Sampler(temperature=0.0))
    gen.set_image(siglip_tokens)    # once per image; None removes it
    out = gen.step(user_codes)      # the user's 8 Mimi codes of this frame

    With `batch_size=B`, user codes are [B, 8] and every output has a leading B; the B
    conversations share the image (or each has its own: tokens [B, N, D]) and the samplers
    (one random key per step draws for all of them).
    """

    def __init__(
        self,
        lm: LM,
        text_sampler: Sampler | None = None,
        audio_sampler: Sampler | None = None,
        xa_start: int = DEFAULT_XA_START,
        keep_logits: bool = False,
        compiled: bool = True,
        batch_size: int = 1,
        kv_bits: int | None = None,
    ):
        self.lm = lm
        cfg = lm.cfg
        self.text_sampler = text_sampler or KYUTAI_GENERATION.text_sampler()
        self.audio_sampler = audio_sampler or KYUTAI_GENERATION.audio_sampler()
        self.xa_start = xa_start
        self.keep_logits = keep_logits
        self.compiled = compiled
        """Compile the step (fixed shapes: one trace serves the whole conversation)."""
        self.batch_size = batch_size
        self.gate_override: float | None = None
        """Replace every cross-attention gate by this constant (research: 0.0 removes the image)."""

        self.num_model_rows = 1 + cfg.dep_q
        self.num_user_codes = cfg.n_q - cfg.dep_q
        self.delays = list(cfg.delays)
        self.max_delay = max(self.delays)
        self._initial = lm.initial_tokens()
        # Which rows still take their initial token at step s (s > max_delay: none).
        self._use_initial = [mx.array([s <= d for d in self.delays])
                             for s in range(self.max_delay + 2)]

        lm.stack()  # one lookup and one projection where a step would launch 17 and 8
        self.caches = lm.make_cache(batch_size, kv_bits)
        """The attention caches, keys and values quantized to `kv_bits` if given (memory)."""
        self.window_full_at = self.caches[0].capacity - 1
        """From this step on every slot of the caches is in the window: attention needs no
        mask (a step variant of its own, compiled by `warm_up` too)."""
        self.span_step = SPAN_STEP
        """Before that, step s reads the first `span_step` * ceil((s + 1) / span_step) slots."""
        self._step_fns: dict[tuple, Callable[..., list[mx.array]]] = {}
        self.image_kv: tuple[mx.array, mx.array] | None = None
        self.last_text_logits: mx.array | None = None
        """[B, text_card] of the last collected step (with `keep_logits`)."""
        self.last_audio_logits: mx.array | None = None
        """[B, dep_q, card] of the last collected step (with `keep_logits`)."""
        self.last_tokens: np.ndarray | None = None
        """[B, 1 + dep_q] generated at the last collected step, delays not undone."""
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
        b = self.batch_size
        # The last `keep` steps' generated tokens [B, 1 + dep_q], gates [B] and user codes
        # [B, n_user], newest last; before the first step, the initial tokens.
        initial = mx.broadcast_to(self._initial[None], (b, self._initial.shape[0]))
        self._generated: deque[mx.array] = deque([initial[:, : self.num_model_rows]] * keep,
                                                 maxlen=keep)
        self._gates: deque[mx.array] = deque([mx.zeros((b,))] * keep, maxlen=keep)
        self._user: deque[mx.array] = deque([initial[:, self.num_model_rows:]] * keep,
                                            maxlen=keep)
        self._attended: deque[bool] = deque([False] * keep, maxlen=keep)
        self.text_sampler.reset()
        self.audio_sampler.reset()

    def set_image(self, tokens: mx.array | np.ndarray | None, reset: bool = False) -> None:
        """Condition on an image: SigLIP tokens [N, D], [1, N, D] or [B, N, D]; None for
        no image.

        The cross-attention keys and values are computed here, once per image. With
        `reset` the conversation restarts, otherwise it goes on with the new image.
        """
        if tokens is None:
            self.image_kv = None
        else:
            tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
            if tokens.ndim == 2:
                tokens = tokens[None]
            if tokens.ndim != 3 or tokens.shape[0] not in (1, self.batch_size):
                raise ValueError(f"image tokens must be [N, D], [1, N, D] or "
                                 f"[{self.batch_size}, N, D], got {tokens.shape}")
            if tokens.shape[-1] != self.lm.cfg.image_dim:
                raise ValueError(
                    f"image tokens have width {tokens.shape[-1]}, the model expects "
                    f"{self.lm.cfg.image_dim}")
            keys, values = self.lm.image_kv(tokens)
            if keys.shape[0] != self.batch_size:
                shape = (self.batch_size, *keys.shape[1:])
                keys, values = mx.broadcast_to(keys, shape), mx.broadcast_to(values, shape)
            keys, values = mx.contiguous(keys), mx.contiguous(values)
            mx.eval(keys, values)
            self.image_kv = (keys, values)
        if reset:
            self.reset()

    def warm_up(self, steps: int = 2, image_tokens: int | None = None) -> None:
        """Runs once each variant of the step a conversation will use, so none compiles
        mid-conversation: the step without the image and, for MoshiVis, the step with an
        image of `image_tokens` tokens (default: the current image's), each also as it runs
        a few steps into a conversation, every `span_step` steps, and once the attention
        window is full. Then starts afresh.
        """
        image_kv, xa_start = self.image_kv, self.xa_start
        silence = np.zeros((self.batch_size, self.num_user_codes), dtype=np.int32)

        def run() -> None:
            for _ in range(steps):
                self.step(silence)
            # The variants of later spans are only traced (they differ in shapes alone:
            # their kernels are those already built); the full window's, without a mask,
            # also runs once. Their values are thrown away with the reset.
            starts = self._variant_starts()[1:]
            for start in starts:
                self._step = max(self._step, start)
                if start == self.window_full_at:
                    self.step(silence)
                else:
                    self._trace(silence)

        try:
            self.image_kv = None
            run()
            if image_kv is not None:
                image_tokens = image_kv[0].shape[2]
            if self.lm.cfg.cross_attention and image_tokens:
                if image_kv is None:
                    self.set_image(mx.zeros((image_tokens, self.lm.cfg.image_dim)))
                else:
                    self.image_kv = image_kv
                self.xa_start = 0
                self.reset()
                run()
        finally:
            self.image_kv, self.xa_start = image_kv, xa_start
            self.reset()

    def _trace(self, user_codes: Codes) -> None:
        """Compiles the step's variant at this step without running it: the caches get
        their evaluated arrays back, and the conversation is reset afterwards anyway."""
        saved = [list(c.state) for c in self.caches]
        history = [deque(d, maxlen=d.maxlen)
                   for d in (self._generated, self._gates, self._user, self._attended)]
        keys = self.text_sampler._key, self.audio_sampler._key
        self.step_async(user_codes, evaluate=False)
        for cache, state in zip(self.caches, saved):
            cache.state[:] = state
        self._generated, self._gates, self._user, self._attended = history
        self.text_sampler._key, self.audio_sampler._key = keys
        self._pending.pop()

    def _variant_starts(self) -> list[int]:
        """The first step of each variant of the attention a conversation goes through."""
        return [*range(0, self.window_full_at, self.span_step), self.window_full_at]

    def _span(self, s: int) -> int | None:
        """The cache slots step s reads (None: all): before the buffer wraps, slot p holds
        position p, so the first s + 1 slots hold everything written."""
        span = -(-(s + 1) // self.span_step) * self.span_step
        return span if s < self.window_full_at and span < self.caches[0].capacity else None

    # -- one step --------------------------------------------------------------------------

    def _user_codes(self, user_codes: Codes) -> mx.array:
        """[B, n_user] int32. Host values are checked; device arrays (a Mimi encoder's
        output) are trusted for their values, so nothing is read back."""
        b, n = self.batch_size, self.num_user_codes
        if isinstance(user_codes, mx.array):
            codes = user_codes.reshape(b, -1)[:, :n]
            if codes.shape[1] != n:
                raise ValueError(f"expected {n} user codes, got {user_codes.shape}")
            return codes.astype(mx.int32)
        codes = np.asarray(user_codes)
        if codes.size < b * n:
            want = f"{n}" if b == 1 else f"{b} x {n}"
            raise ValueError(f"expected {want} user codes, got shape {list(codes.shape)}")
        codes = codes.reshape(b, -1)[:, :n]
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"user codes must be integers, got {codes.dtype}")
        card = self.lm.cfg.card
        if codes.min() < -1 or codes.max() >= card:
            raise ValueError(f"user codes must be in [0, {card}) (or -1 for a zero embedding)")
        return mx.array(codes.astype(np.int32))

    def _forced(self, force_text: object, force_audio: object) -> mx.array | None:
        """The teacher-forced tokens of this step [B, 1 + dep_q], or None."""
        if force_text is None and force_audio is None:
            return None
        dep_q, b = self.lm.cfg.dep_q, self.batch_size
        if force_text is None or force_audio is None:
            raise ValueError(f"teacher forcing needs the text token and {dep_q} codes")
        text = np.asarray(force_text, dtype=np.int64).reshape(b, 1)
        audio = np.asarray(force_audio, dtype=np.int64)
        if audio.size != b * dep_q:
            raise ValueError(f"teacher forcing needs the text token and {dep_q} codes")
        return mx.array(np.concatenate([text, audio.reshape(b, dep_q)], axis=1), dtype=mx.int32)

    def step(self, user_codes: Codes, force_text: object = None,
             force_audio: object = None) -> StepOutput | None:
        """Feed the user's codes of one frame; returns the model's frame (None at step 0).

        `force_text` / `force_audio` replace the sampled tokens of this step (teacher
        forcing, e.g. to score a given transcript); the logits are computed as usual.
        """
        return self.step_async(user_codes, force_text, force_audio).result()

    def step_async(self, user_codes: Codes, force_text: object = None,
                   force_audio: object = None, evaluate: bool = True) -> PendingStep:
        """Submits a step and returns at once; `.result()` waits for its output.

        The step's graph depends on earlier steps only through arrays, so a caller holding
        the next frame's codes can submit it before collecting this one (file mode). With
        `evaluate=False` nothing is scheduled: the caller builds more on `pending.tokens`
        (the Mimi decoder) and evaluates the whole frame once (`pending.outputs` with it).
        """
        s = self._step
        self._user.append(self._user_codes(user_codes))
        cross = self.image_kv is not None and s >= self.xa_start
        forced = self._forced(force_text, force_audio)
        full = s >= self.window_full_at
        outputs = self._step_fn(cross, forced is not None, full, self._span(s))(
            list(self._generated), list(self._gates), list(self._user),
            self._use_initial[min(s, self.max_delay + 1)],
            self.text_sampler.next_key(), self.audio_sampler.next_key(),
            self.image_kv if cross else None, forced)
        if evaluate:
            mx.async_eval(outputs)  # the one evaluation of the step
        generated, gate, tokens, out_gate = outputs[:4]
        self._generated.append(generated)
        self._gates.append(gate)
        self._attended.append(cross)
        attended = self._attended[-1 - self.max_delay + self.delays[0]]
        pending = PendingStep(self, s, outputs, tokens if s >= self.max_delay else None,
                              out_gate if attended else None, self._epoch)
        self._pending.append(pending)
        self._step += 1
        return pending

    def limit_compiled(self, keep: int) -> None:
        """Forgets every compiled step variant once more than `keep` exist (each sampling
        setting compiles its own: a server whose clients choose their sampling must not
        grow without bound); they compile again when next used."""
        if len(self._step_fns) > keep:
            self._step_fns.clear()

    def _step_fn(self, cross: bool, forced: bool, full: bool = False, span: int | None = None
                 ) -> Callable[..., list[mx.array]]:
        """The step function of this variant, compiled once and kept.

        Everything that changes the traced graph is part of the key; the position (in the
        caches), the random keys, the tokens and the image are arrays, so one compiled
        function serves every step of a conversation.
        """
        key = (cross, forced, full, span, self.keep_logits, self.gate_override, self.compiled,
               self.text_sampler.settings, self.audio_sampler.settings)
        fn = self._step_fns.get(key)
        if fn is None:
            fn = self._make_step_fn(cross, forced, full, span)
            if self.compiled:
                state = [c.state for c in self.caches]
                fn = mx.compile(fn, inputs=state, outputs=state)
            self._step_fns[key] = fn
        return fn

    def _make_step_fn(self, cross: bool, forced: bool, full: bool, span: int | None
                      ) -> Callable[..., list[mx.array]]:
        lm, caches = self.lm, self.caches
        text_sampler, audio_sampler = self.text_sampler, self.audio_sampler
        keep_logits, gate_override = self.keep_logits, self.gate_override
        dep_q, delays, max_delay = lm.cfg.dep_q, self.delays, self.max_delay
        n_model, initial = self.num_model_rows, self._initial
        batch = self.batch_size

        def input_tokens(generated, user, use_initial):
            """The [B, 17, 1] input column: model rows from the last step, user rows as
            delayed; the rows still within their delay (`use_initial`) get their initial
            token."""
            cols = [generated[-1][:, r] if r < n_model else user[-1 - d][:, r - n_model]
                    for r, d in enumerate(delays)]
            column = mx.where(use_initial[None], initial[None], mx.stack(cols, axis=1))
            return column[:, :, None]

        def step(generated, gates, user, use_initial, text_key, audio_key, image, forced_tokens):
            xa = CrossAttentionInput(lm.xa, *image, force_gate=gate_override) if cross else None
            tokens_in = input_tokens(generated, user, use_initial)
            h, text_logits = lm.forward_text(tokens_in, caches, xa, window_full=full, span=span)
            text_logits = text_logits[:, 0]
            if forced:
                text = forced_tokens[:, 0]
                codes = iter(forced_tokens[:, 1:].T)
                sample = lambda logits: next(codes)  # noqa: E731
            else:
                text = text_sampler.sample(text_logits, text_key)
                # The noise of the frame's dep_q audio draws at once: one kernel, not eight.
                noise = audio_sampler.noise(audio_key, (dep_q, batch), lm.cfg.card)
                draw = iter(range(dep_q))

                def sample(logits: mx.array) -> mx.array:
                    i = next(draw)
                    return audio_sampler.sample(
                        logits, noise=None if noise is None else noise[i])
            depformer_caches = lm.depformer.make_cache()
            audio, audio_logits = lm.depformer(h, text, sample, depformer_caches,
                                               zero_tokens=forced)
            now = mx.concatenate([text[:, None], audio], axis=1).astype(mx.int32)
            gate = xa.mean_gate()[:, 0] if cross else mx.zeros((batch,))
            # The frame this step completes: row r as generated at step s - max_delay + d[r].
            history = [*generated[1:], now]
            tokens = mx.stack([history[-1 - max_delay + d][:, r]
                               for r, d in enumerate(delays[:n_model])], axis=1)
            out_gate = [*gates[1:], gate][-1 - max_delay + delays[0]]
            outputs = [now, gate, tokens, out_gate]
            if keep_logits:
                outputs += [text_logits, mx.stack(audio_logits, axis=1)]
            return outputs

        return step

    def _collect(self, upto: PendingStep) -> None:
        """Materialises submitted steps in order, up to and including `upto` (reading an
        array waits for its evaluation; nothing more is evaluated here)."""
        while self._pending and upto.output is _NOT_READY:
            p = self._pending.popleft()
            self.last_tokens = np.array(p.outputs[0])
            if self.keep_logits:
                self.last_text_logits, self.last_audio_logits = p.outputs[4], p.outputs[5]
            p.output = p.host_output()
            p.outputs = []


_NOT_READY = object()


class PendingStep:
    """A submitted step of a `Generator`; `result()` waits for its output.

    `tokens` [B, 1 + dep_q] (text, then the dep_q codes) and `gate` [B] are the frame it
    completes as device arrays, not evaluated (None while the acoustic delay holds the
    frame back, or the image was not attended): a caller can hand them on (to the Mimi
    decoder) and evaluate everything once. Steps are collected in the order they were
    submitted, whichever handle asks first.
    """

    def __init__(self, gen: Generator, index: int, outputs: list[mx.array],
                 tokens: mx.array | None, gate: mx.array | None, epoch: int):
        self._gen = gen
        self.index = index
        self.outputs = outputs
        self.tokens = tokens
        self.gate = gate
        self.epoch = epoch
        self.output: object = _NOT_READY

    def host_output(self) -> StepOutput | None:
        """The evaluated frame on the host (None at the first steps)."""
        if self.tokens is None:
            return None
        tokens = np.array(self.tokens)
        gates = None if self.gate is None else np.array(self.gate)
        return StepOutput(text=tokens[:, 0], audio=tokens[:, 1:], gates=gates)

    def result(self) -> StepOutput | None:
        if self.output is _NOT_READY:
            if self.epoch != self._gen._epoch:
                raise RuntimeError("this step was submitted before the generator was reset")
            self._gen._collect(self)
        return self.output  # type: ignore[return-value]
