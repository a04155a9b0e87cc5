"""Text tokens -> the pieces of the transcript.

Moshi's text stream emits one SentencePiece token per 80 ms frame. Most frames carry
the padding token or the end-of-padding marker (their ids are the language model's
config: `LmConfig.text_padding_id`, `end_of_text_padding_id`); neither is a word. A piece that
starts with "▁" begins a new word, the others continue the current one.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TokenizerError

TOKENIZER_NAME = "tokenizer.model"
WORD_START = "\u2581"  # ▁


def find_tokenizer(bundle: str | Path) -> Path:
    """The bundle's SentencePiece model: tokenizer.model, or Kyutai's tokenizer_spm_*.model."""
    bundle = Path(bundle)
    path = bundle / TOKENIZER_NAME
    if path.exists():
        return path
    found = sorted(bundle.glob("tokenizer_spm*.model"))
    if found:
        return found[0]
    raise TokenizerError(
        f"{bundle}: no {TOKENIZER_NAME}; copy Kyutai's tokenizer_spm_32k_3.model into the "
        f"bundle as {TOKENIZER_NAME}")


class TextTokenizer:
    """SentencePiece pieces for the model's text tokens; None for tokens that are not text."""

    def __init__(self, path: str | Path, padding_ids: tuple[int, ...]):
        """`padding_ids`: the model's padding and end-of-padding ids (from its config)."""
        import sentencepiece

        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.padding_ids = set(padding_ids)
        n = self.sp.get_piece_size()
        # Precomputed once: the model emits a token every 80 ms for hours.
        self._pieces: list[str | None] = []
        for i in range(n):
            is_text = not (i in self.padding_ids or self.sp.is_control(i)
                           or self.sp.is_unknown(i) or self.sp.is_unused(i))
            self._pieces.append(self.sp.id_to_piece(i) if is_text else None)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def piece(self, token: int) -> str | None:
        """The text of `token` ("▁" marks a word start), or None for padding and
        control tokens (and ids beyond the vocabulary)."""
        if 0 <= token < len(self._pieces):
            return self._pieces[token]
        return None


def starts_word(piece: str) -> bool:
    return piece.startswith(WORD_START)
