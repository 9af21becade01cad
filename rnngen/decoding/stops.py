"""Stop strings: generation ends before the first one, and none of it is ever shown.

One rule for sampling and beam search: text that could still become a stop
string is held back until later text decides.
"""

from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stop_safe_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the part of text that no later text can turn into a stop string (a possible start is held back)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return len(text) - hold


class StopStringFilter:
    """Passes text through until a stop string appears; nothing from the stop string on gets out.

    Text that could be the start of a stop string is held back until the next
    chunk decides, so a stop string split across chunks is still caught.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.stopped = False
        self._pending = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + text
        if not self.stops:
            self._pending = ""
            return buf
        cut = find_stop(buf, self.stops)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        safe = stop_safe_length(buf, self.stops)
        self._pending = buf[safe:]
        return buf[:safe]

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    @property
    def held(self) -> str:
        """Text held back (not yet passed through) because it could begin a stop string."""
        return self._pending

    def restore(self, held: str) -> None:
        """Go on from `held` of an earlier filter (a resumed stream): it is passed through or cut as if never interrupted."""
        self._pending = held
