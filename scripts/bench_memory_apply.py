"""Seconds per ``apply`` of the trained memory and patch editors, each against a slower way.

T-Patcher, CaliNET and WISE train something at one block with the model frozen. T-Patcher and
WISE run, on each step, only the blocks from their own up (:func:`editors.core.prefix.frozen_below`);
the slower way runs every block. CaliNET, whose slots sit in the last block by default, reads
the logits of the positions that matter from one recording
(:class:`editors.core.prefix.TopMLPReadout`) and runs no block at all on a step; the slower way
is its fallback for other layers, which runs the hooked blocks on every step. (GRACE goes further than frozen_below with :class:`editors.core.prefix.FrozenPrefix`:
see ``bench_edit_seconds.py``.) Each editor's ``apply`` (one CounterFact request per call,
reverted after) is timed both ways, alternating per request in one process so that machine load
hits both alike; the script prints the medians and their ratio.

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

    class NoReadout:  # the editors' fallback: train through the hooked blocks
        exact = False

        def __init__(self, *_args, **_kwargs) -> None:
            pass

    # editor -> (the module attribute the slower way replaces, its stand-in, the two ways' names)
    slower = {
        "t_patcher": ("frozen_below", every_block, "frozen_below s", "all blocks s"),
        "calinet": ("TopMLPReadout", NoReadout, "readout s", "top block s"),
        "wise": ("frozen_below", every_block, "frozen_below s", "all blocks s"),
    }
    print(f"{'editor':<10}{'way':>16}{'s':>8}{'slower way':>16}{'s':>8}{'ratio':>8}   ({len(requests)} requests, medians)")
    for name in args.methods:
        module = importlib.import_module(modules[name])
        editor_class = get_editor(name)
        editor, config = editor_class(), editor_class.config_class()
        attribute, stand_in, fast_name, slow_name = slower[name]
        original = getattr(module, attribute)
        times: dict[str, list[float]] = {"fast": [], "slow": []}
        for request in requests:
            for way in ("fast", "slow"):
                setattr(module, attribute, original if way == "fast" else stand_in)
                try:
                    start = time.perf_counter()
                    edit = editor.apply(model, tokenizer, [request], config)
                    times[way].append(time.perf_counter() - start)
                finally:
                    setattr(module, attribute, original)
                edit.revert(model)
        fast, slow = statistics.median(times["fast"]), statistics.median(times["slow"])
        print(f"{name:<10}{fast_name:>16}{fast:>8.2f}{slow_name:>16}{slow:>8.2f}{slow / fast:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
