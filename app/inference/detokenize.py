"""Turn a stream of token ids into a stream of text, honouring stop sequences.

Two problems are solved here:
- a token may hold half a UTF-8 character, so text is released only once it decodes
  cleanly (the approach of text-generation servers: decode a small window and diff);
- a stop string may span several tokens, so text that could be the start of a stop
  string is held back until it is known not to be one. The concatenated texts of the
  emitted tokens always equal the final answer, stop string excluded.
"""

from __future__ import annotations

from dataclasses import dataclass


class IncrementalDecoder:
    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0    # ids before this are already turned into text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._ids[self._prefix:]
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        now = self._tok.decode(window, skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""


@dataclass
class _Held:
    index: int
    text: str


class StopSequenceFilter:
    """Decides how much of each token's text may be released to the client.

    `feed(index, text)` returns the list of (index, released_text) now final, and
    whether a stop string was hit (then generation must end).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held: list[_Held] = []
        self._pending = ""  # text of held tokens, concatenated

    def feed(self, index: int, text: str) -> tuple[list[tuple[int, str]], bool]:
        if not self._stops:
            return [(index, text)], False
        self._held.append(_Held(index, text))
        self._pending += text
        hit = min((p for p in (self._pending.find(s) for s in self._stops) if p >= 0), default=-1)
        if hit >= 0:
            return self._release(hit, drop_rest=True), True
        return self._release(len(self._pending) - self._partial_suffix()), False

    def flush(self) -> list[tuple[int, str]]:
        """Release everything still held (generation ended for another reason)."""
        return self._release(len(self._pending))

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of pending text that starts some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int, drop_rest: bool = False) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        consumed = 0
        while self._held:
            held = self._held[0]
            if consumed + len(held.text) <= upto:
                out.append((held.index, held.text))
                consumed += len(held.text)
                self._held.pop(0)
            elif drop_rest:
                # The token that holds the stop string's start keeps only the text before it;
                # tokens inside the stop string are released with no text.
                out.append((held.index, held.text[: max(0, upto - consumed)]))
                consumed = upto
                self._held.pop(0)
            else:
                break
        self._pending = "" if drop_rest else self._pending[consumed:]
        return out
