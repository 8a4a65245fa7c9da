"""Wall time and peak memory of an edit.

On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` over the edit (device memory held by
tensors). On CPU there is no allocator counter, so a background thread samples the process's
resident set size every few milliseconds; the figure is the process's peak RSS during the edit
(model weights included), a slight underestimate for spikes shorter than the sampling interval.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


class measure:
    """``with measure(device) as m: ...`` fills ``m.seconds`` and ``m.peak_memory_mb``."""

    def __init__(self, device: torch.device | str, interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.result.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.result.peak_memory_mb = self._peak / 2**20
