"""The daemon's current problems: what `ping` and `stats` list in `problems` (CONTRACT.md).

A problem is a condition that lasts (a state or resume write that keeps failing, a full disk, a
missing storage path), keyed by what it is about, with one sentence for the operator. Each is
logged once when it starts and once when it ends, however often the code that meets it reports
it meanwhile (a retry loop reports at every attempt).

One `Problems` is shared by the actors of one daemon, like its logger: they only report and
clear their own keys, and everything runs on one event loop, so nothing needs a lock.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Problems:
    """Current problems by key; see the module docstring."""

    def __init__(self) -> None:
        self._current: dict[str, str] = {}

    def report(self, key: str, sentence: str) -> None:
        """`key` is a problem now (or still): logged when it starts; the sentence may change."""
        if key not in self._current:
            log.warning("problem: %s", sentence)
        self._current[key] = sentence

    def clear(self, key: str) -> None:
        """`key` is no longer a problem: logged when it was one."""
        sentence = self._current.pop(key, None)
        if sentence is not None:
            log.info("problem over: %s", sentence)

    def has(self, key: str) -> bool:
        return key in self._current

    def current(self) -> list[str]:
        """One sentence per current problem, in the order they started."""
        return list(self._current.values())
