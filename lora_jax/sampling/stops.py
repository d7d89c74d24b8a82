"""Stop strings, found in an answer's text as its tokens arrive, across token boundaries.

Tokens arrive in chunks (one per decode round trip). Each chunk is detokenized incrementally, as
vLLM does: decode a few already-seen tokens plus the new ones and keep the part past the old text,
so byte-level pieces and leading-space rules come out as a full decode would write them. Only the
tail that could hold a new match (the new text plus len(longest stop) - 1 earlier characters) is
searched, so a 32k-token trace costs linear work. When a chunk holds a match, its tokens are
replayed one by one to find the token that completed it: the answer keeps the tokens up to that
one and its text ends just before the stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_CONTEXT = 6  # already-decoded tokens re-decoded with new ones (BPE merges, leading spaces)


class StopStrings:
  """Tracks one answer. `extend(ids)` returns the answer's token count up to and including the
  token that completed a stop string, or None; `text` is the text seen so far."""

  def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str]):
    self.stops = tuple(s for s in stops if s)
    self.decode = decode
    self.longest = max((len(s) for s in self.stops), default=0)
    self.ids: list[int] = []
    self.text = ""  # text of ids[:self.done]
    self.done = 0
    self.match: str | None = None  # the stop string found

  def extend(self, new_ids: Sequence[int]) -> int | None:
    start = len(self.ids)
    self.ids.extend(new_ids)
    if not self.stops or self.match is not None:
      return None
    found, fresh = self._scan(len(self.ids))
    if found is None:
      if not fresh.endswith("\ufffd"):  # an unfinished multi-byte character waits for its bytes
        self.text += fresh
        self.done = len(self.ids)
      return None
    # Replay the chunk to find the token that completed it (the last one at the latest).
    end = next(e for e in range(start + 1, len(self.ids) + 1) if self._scan(e)[0] is not None)
    self.match = self._scan(end)[0]
    return end

  def _scan(self, end: int) -> tuple[str | None, str]:
    """(first stop string in the text of ids[:end] not searched before, or None; the new text)."""
    context = max(0, self.done - _CONTEXT)
    old = self.decode(self.ids[context : self.done])
    new = self.decode(self.ids[context:end])
    fresh = (
      new[len(old) :] if new.startswith(old) else self.decode(self.ids[:end])[len(self.text) :]
    )
    hay = self.text[max(0, len(self.text) - self.longest + 1) :] + fresh.rstrip("\ufffd")
    hits = [(hay.find(s), s) for s in self.stops if s in hay]
    return (min(hits)[1] if hits else None), fresh


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
  """Text before the earliest stop string, and that stop string (None if there is none)."""
  hits = [(text.find(s), s) for s in stops if s and s in text]
  if not hits:
    return text, None
  at, stop = min(hits)
  return text[:at], stop
