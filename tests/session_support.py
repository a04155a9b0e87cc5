"""A scripted stand-in for `Stream`, so that what a session, file mode or the evaluation
makes of the model's output can be tested exactly: the model says `script[s]` (a token)
at step s, one step late like Moshi's text, and its voice is loud while it says words."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from moshivis_mlx.stream import RELEASED, StepResult

PAD = 3
WORDS = {10: "\u2581hello", 11: "\u2581a", 12: "\u2581red", 13: "\u2581house", 14: "s",
         20: "\u2581what", 21: "\u2581colour"}


class _Pending:
    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result


class ScriptedStream:
    """`submit(pcm, force_text, force_audio)` like `Stream`'s; records what was forced."""

    def __init__(self, script: dict[int, int], words: dict[int, str] | None = None):
        self.script = script
        self.words = WORDS if words is None else words
        self.geometry = RELEASED
        self.gen = SimpleNamespace(max_delay=1, lm=SimpleNamespace(
            cfg=SimpleNamespace(dep_q=8, text_padding_id=PAD)))
        self.tokenizer = SimpleNamespace(piece=self.words.get,
                                         sp=SimpleNamespace(encode=lambda text: [20, 21]))
        self.mimi = SimpleNamespace(streaming_encoder=lambda k: SimpleNamespace(
            step=lambda pcm: np.full(k, 5)))
        self.forced: list[tuple[int, int]] = []
        self.submitted = 0
        self.images: list[object] = []
        self.reset()

    def reset(self) -> None:
        self.step, self.made = 0, []

    def set_image(self, tokens) -> None:
        self.images.append(tokens)

    def submit(self, pcm, force_text=None, force_audio=None) -> _Pending:
        s = self.step
        token = force_text if force_text is not None else self.script.get(s, PAD)
        if force_text is not None:
            self.forced.append((s, force_text))
            assert np.asarray(force_audio).shape == (8,)
        self.made.append(token)
        self.step += 1
        self.submitted += 1
        out = self.made[s - 1] if s else None
        piece = self.words.get(out) if out is not None else None
        voice = np.full(1920, 0.3 if piece else 0.001, np.float32)
        return _Pending(StepResult(step=s, pcm=voice, text_token=out, piece=piece, gate=None,
                                   latency_ms=1.0, host_ms=0.5))
