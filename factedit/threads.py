"""How many threads PyTorch uses on the CPU.

PyTorch starts one intra-op thread per core. On a small machine where another process is busy, those
threads wait on each other at every operation (OpenMP barriers), and a run becomes two to three
times slower than on one thread: ``scripts/bench_threads.py`` measured 2.0x for the default model's
forward and backward pass and 2.6x for a decoding step beside one busy neighbour on two cores (the
README's "Run on a busy machine: threads"). The default, ``auto``, therefore leaves the cores that
other processes already use:

    threads = max(1, min(cores, round(cores - load)))

where ``cores`` are the cores this process may run on and ``load`` the one-minute load average
when the run starts. An explicit ``--threads N``, or ``OMP_NUM_THREADS`` set in the environment,
wins over the rule.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

AUTO = "auto"


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def load_average() -> float:
    """The one-minute load average (0.0 where the system does not report one)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int | str | None = AUTO, cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """The number of threads to use and why (for the log): ``requested`` if it is a number,
    else ``OMP_NUM_THREADS`` if set, else the rule of the module docstring."""
    if requested not in (None, AUTO):
        try:
            threads = int(requested)
        except (TypeError, ValueError):
            raise ValueError(f"--threads must be a number of threads or 'auto', got {requested!r}") from None
        if threads < 1:
            raise ValueError(f"--threads must be at least 1 or 'auto', got {requested}")
        return threads, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    load = load_average() if load is None else load
    threads = max(1, min(cores, round(cores - load)))
    return threads, f"auto: {cores} cores, load average {load:.2f}"


def set_threads(requested: int | str | None = AUTO) -> int:
    """Apply :func:`choose_threads` to PyTorch's intra-op pool; returns the number used."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    logger.info("using %d CPU thread%s (%s; --threads to change)", threads, "" if threads == 1 else "s", why)
    return threads
