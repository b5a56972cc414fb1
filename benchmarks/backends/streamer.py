"""A transformers streamer that stamps the time each new token arrives (the baseline's own loop)."""

from __future__ import annotations

import time


class StampStreamer:
    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass
