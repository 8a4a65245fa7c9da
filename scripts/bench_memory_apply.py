"""Seconds per ``apply`` of the trained memory and patch editors, with and without frozen_below.

T-Patcher, CaliNET and WISE train something at one block with the model frozen; inside
:func:`editors.prefix.frozen_below` only the blocks from that one up run on each step (GRACE
goes further, with :class:`editors.prefix.FrozenPrefix`: see ``bench_edit_seconds.py``). This
script times each editor's ``apply`` (one CounterFact request per call, reverted after) both
ways, alternating per request in one process so that machine load hits both alike, and prints
the medians and their ratio.

    OMP_NUM_THREADS=2 python scripts/bench_memory_apply.py --limit 5 --methods t_patcher calinet wise
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5, help="requests per editor (the first of the data file)")
    parser.add_argument("--methods", nargs="+", default=["t_patcher", "calinet", "wise"], choices=["t_patcher", "calinet", "wise"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/counterfact/counterfact_test.json"))
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import importlib

    from factedit.datamodules.records import load_requests
    from factedit.editors import get_editor
    from factedit.models import load_model

    model, tokenizer = load_model(args.model)
    requests = load_requests(args.data if Path(args.data).exists() else "counterfact-demo", limit=args.limit)
    modules = {"t_patcher": "factedit.editors.t_patcher.editor", "calinet": "factedit.editors.calinet.editor", "wise": "factedit.editors.wise.editor"}

    @contextlib.contextmanager
    def every_block(*_args, **_kwargs):
        yield

    print(f"{'editor':<10}{'frozen_below s':>16}{'all blocks s':>14}{'ratio':>8}   ({len(requests)} requests, medians)")
    for name in args.methods:
        module = importlib.import_module(modules[name])
        editor_class = get_editor(name)
        editor, config = editor_class(), editor_class.config_class()
        original = module.frozen_below
        times: dict[str, list[float]] = {"frozen": [], "full": []}
        for request in requests:
            for way in ("frozen", "full"):
                module.frozen_below = original if way == "frozen" else every_block
                try:
                    start = time.perf_counter()
                    edit = editor.apply(model, tokenizer, [request], config)
                    times[way].append(time.perf_counter() - start)
                finally:
                    module.frozen_below = original
                edit.revert(model)
        frozen, full = statistics.median(times["frozen"]), statistics.median(times["full"])
        print(f"{name:<10}{frozen:>16.2f}{full:>14.2f}{full / frozen:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
