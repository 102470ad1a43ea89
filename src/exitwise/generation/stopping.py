"""Stop strings and streaming for the decoders.

``StopStrings`` decodes the tail of a row's *generated* tokens (the prompt is never searched)
and says when a stop string ends inside the newest token, as Hugging Face's
``StopStringCriteria`` does: the stop string may start in earlier tokens, and the newest token
may run past its end (stop ``"SUf"`` fires on the tokens ``" SU"``, ``"forts"``). The token
that completes a stop string is kept, nothing after it. Rows are checked after every token,
so a stop string that ended in an earlier token has already stopped its row.

``StreamingSession`` is a :class:`DecodeSession` whose ``emit`` also applies the stop strings
and calls ``callback(row, new_token_ids)`` with exactly the tokens each row commits in a step
(after EOS / budget / stop-string truncation). Self-speculative decoding emits only accepted
drafts and the full model's own token, so rejected drafts are never streamed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from .session import DecodeSession

TokenCallback = Callable[[int, list[int]], None]

# Tokens decoded beyond the longest stop string's length in UTF-8 bytes (a byte-level
# tokenizer may spend a token per byte): room for tokens that decode to nothing (special
# tokens).
_SLACK_TOKENS = 8


class StopStrings:
    """Stop a row once any of ``strings`` ends inside its newest generated token.

    tokenizer: anything with ``decode(list[int], skip_special_tokens=...)``.
    """

    def __init__(self, strings: Sequence[str], tokenizer: Any) -> None:
        if isinstance(strings, str):
            strings = [strings]
        strings = list(strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ConfigError(f"stop_strings must be a list of non-empty strings; got {strings!r}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ConfigError("stop_strings need a tokenizer (an object with .decode(ids))")
        self.strings = strings
        self.tokenizer = tokenizer
        # a token decodes to >= 1 byte, bar special ones
        self.window = max(len(s.encode("utf-8")) for s in strings) + _SLACK_TOKENS

    def hit(self, generated: list[int]) -> bool:
        """True when a stop string ends inside the text of ``generated[-1]`` (``generated``: a
        row's new tokens): it occurs in the tail's text and its end lies past the text of the
        tokens before the last."""
        tail = generated[-self.window :]
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        if not any(s in text for s in self.strings):  # the usual case: one decode per token
            return False
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
        # Where decoding is not prefix-stable (a partial UTF-8 character decodes to U+FFFD
        # until its last byte arrives) the newest token's text starts where the two texts
        # part: their common prefix.
        boundary = len(before) if text.startswith(before) else len(
            os.path.commonprefix([text, before]))
        for s in self.strings:
            start = max(0, boundary - len(s) + 1)  # occurrences from here end past the boundary
            if s in text[start:]:
                return True
        return False


class StreamingSession(DecodeSession):
    """A decoding session with stop strings and a per-step token callback.

    stop: a :class:`StopStrings` or None. callback: ``callback(row, new_token_ids)`` with the
    original row index (0..B-1) and the tokens just committed for it (never empty).
    """

    def __init__(
        self,
        *args: Any,
        stop: StopStrings | None = None,
        callback: TokenCallback | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback must be callable(row, new_token_ids); got {callback!r}")
        self.stop = stop
        self.callback = callback

    def stops(self, generated: list[int]) -> bool:
        return self.stop is not None and self.stop.hit(generated)

    def committed(self, row: int, tokens: list[int]) -> None:
        if self.callback is not None:
            self.callback(row, tokens)
