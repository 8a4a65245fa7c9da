"""How many PyTorch threads to use: the default model's forward + backward (the work of an edit)
and one decoding step (the work of scoring), timed with 1 and 2 threads, alone and beside a busy
neighbour (another process multiplying matrices on one thread, as a second job or a browser
would), all in one run so the ratios compare like with like.

    python scripts/bench_threads.py [--iters 5] [--threads 1 2]

Prints seconds per iteration for each (neighbour, threads) pair and the slowdown against one
thread alone. ``factedit.threads.choose_threads`` implements the policy these figures support.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def neighbour(stop) -> None:
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a @ a


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    from factedit.models import load_model

    model, _ = load_model(args.model)
    model.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (16, 20))
    one = torch.randint(0, model.config.vocab_size, (1, 1))

    def step() -> None:  # forward + backward of a 16 x 20 batch
        model.zero_grad(set_to_none=True)
        model.model(ids).last_hidden_state.pow(2).mean().backward()

    @torch.no_grad()
    def decode() -> None:  # one token through the whole model, as greedy decoding does
        model(one)

    print(f"cores available: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
          f"load average at start: {os.getloadavg()[0]:.2f}")
    results: dict[tuple[str, str, int], float] = {}
    for busy in (False, True):
        stop = mp.Event()
        proc = mp.Process(target=neighbour, args=(stop,)) if busy else None
        if proc:
            proc.start()
            time.sleep(1.0)
        try:
            for threads in args.threads:
                torch.set_num_threads(threads)
                results[("busy" if busy else "alone", "step", threads)] = timed(step, args.iters)
                results[("busy" if busy else "alone", "decode", threads)] = timed(decode, args.iters * 10)
        finally:
            if proc:
                stop.set()
                proc.join()
    for work in ("step", "decode"):
        base = results[("alone", work, 1)]
        for (where, w, threads), seconds in results.items():
            if w == work:
                print(f"{work:<7} {where:<6} threads={threads}: {seconds * 1000:9.1f} ms   x{seconds / base:5.2f} of 1 thread alone")


if __name__ == "__main__":
    main()
