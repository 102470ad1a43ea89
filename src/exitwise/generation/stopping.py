"""Stop strings and streaming for the decoders.

``StopStrings`` decodes the tail of a row's *generated* tokens (the prompt is never searched)
and says when the text ends with one of the stop strings, as Hugging Face's
``StopStringCriteria`` does: the token that completes a stop string is kept, nothing after it.
A stop string that ends in the middle of a token is not detected (the text must *end* with it).

``StreamingSession`` is a :class:`DecodeSession` whose ``emit`` also applies the stop strings
and calls ``callback(row, new_token_ids)`` with exactly the tokens each row commits in a step
(after EOS / budget / stop-string truncation). Self-speculative decoding emits only accepted
drafts and the full model's own token, so rejected drafts are never streamed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import ConfigError
from .session import DecodeSession

TokenCallback = Callable[[int, list[int]], None]

# Tokens decoded beyond the longest stop string's length in characters: room for tokens that
# decode to nothing (special tokens) or to partial UTF-8 bytes.
_SLACK_TOKENS = 8


class StopStrings:
    """Stop a row once its generated text ends with any of ``strings``.

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
        # a token decodes to >= 1 character, bar special / partial-byte ones
        self.window = max(len(s) for s in strings) + _SLACK_TOKENS

    def hit(self, generated: list[int]) -> bool:
        """True when the text of ``generated`` (a row's new tokens) ends with a stop string."""
        tail = generated[-self.window :]
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(text.endswith(s) for s in self.strings)


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
