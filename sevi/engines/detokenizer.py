"""A request's output text, grown one token at a time (both engines stream through it).

Why not `tokenizer.decode(all ids)` per token: that is O(n) per token, O(n^2) per request, and at a few
hundred tokens it costs more than a decode step of a small model. The fast tokenizers' `DecodeStream`
keeps the small window of ids it still needs (multi-byte characters split across tokens, a
sentencepiece word-start space) and returns only the new piece. Where it cannot give the same text as a
whole decode (a slow tokenizer, transformers' `clean_up_tokenization_spaces` post-processing, ids the
tokenizer does not know), the request falls back to whole decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Output ids and text of one request; :meth:`append` adds a (non-EOS) token and reports the end.

    With stop strings, the pieces it returns hold back the text's last `len(longest stop) - 1`
    characters until the end (a stop string may be starting there, and streamed text cannot be taken
    back); :meth:`flush` releases them when the request ends for a reason `append` did not see (EOS).
    The pieces always add up to :attr:`text`.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        max_tokens: int | None = None,
        *,
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._max_tokens = max_tokens
        # vLLM's min_tokens: a stop string counts only where it starts after the text of the first min_tokens tokens.
        self._min_tokens = min_tokens
        self._stop_from = 0 if min_tokens == 0 else -1  # -1: not yet min_tokens tokens
        self._skip_special = skip_special_tokens
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output: the text keeps the stop string
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._sent = 0  # characters of `text` returned so far
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: Any = None
        if self._backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def append(self, token: int) -> tuple[str, str | None]:
        """Add `token`; returns the new text since the last call and the finish reason: "stop" when a stop
        string appeared (the text is cut before it), "length" at `max_tokens`, else None."""
        old = self.text
        self.token_ids.append(token)
        full, grown = self._text_with(token)
        finish: str | None = None
        for s in self._stop if self._stop_from >= 0 else ():
            # When the text only grew, earlier calls saw no stop string: a match must end in the new piece.
            cut = full.find(s, max(self._stop_from, len(old) - len(s) + 1) if grown else self._stop_from)
            if cut >= 0:
                full, finish = full[: cut + len(s) if self._include_stop else cut], "stop"
        if self._stop_from < 0 and len(self.token_ids) >= self._min_tokens:
            self._stop_from = len(full)
        if finish is None and self._max_tokens is not None and len(self.token_ids) >= self._max_tokens:
            finish = "length"
        self.text = full
        return self._emit(final=finish is not None), finish

    def flush(self) -> str:
        """The text not returned yet (held back for stop strings), at an end `append` did not report."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        upto = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        piece = self.text[self._sent : upto]
        self._sent = max(self._sent, upto)
        return piece

    def _text_with(self, token: int) -> tuple[str, bool]:
        """The text with `token` added, and whether it is the old text plus a suffix."""
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token)  # None: a character still incomplete
                return self.text + (piece or ""), True
            except Exception:  # noqa: BLE001 - e.g. an id past the tokenizer's vocabulary: whole decodes
                self._stream = None
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=self._skip_special)
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return self.text, True
        return str(full), False
