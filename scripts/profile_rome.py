"""Where ROME's time goes on the default model: a profile of a few edits, statistics cached.

    python scripts/profile_rome.py [--records 5] [--layer 4]

Prints seconds per edit, optimisation steps, and the share of time spent in the parts of an
edit: building the batch and the frozen prefix, the forward passes through the blocks from the
edited one up, the backward passes, the unembedding (logits only where a loss reads them), and
the closed-form update.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/counterfact/counterfact_test.json"))
    parser.add_argument("--records", type=int, default=5)
    parser.add_argument("--layer", type=int, default=None)
    args = parser.parse_args()

    from factedit.datamodules.records import load_requests
    from factedit.editors import get_editor
    from factedit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    requests = load_requests(args.data, limit=args.records + 1)
    editor_cls = get_editor("rome")
    config = editor_cls.config_class(**({"layer": args.layer} if args.layer is not None else {}))
    editor = editor_cls()
    start = time.perf_counter()
    editor.prepare(model, tokenizer, config)
    print(f"prepare (statistics from cache or computed, prefixes sampled): {time.perf_counter() - start:.2f} s")
    editor.apply(model, tokenizer, requests[:1], config).revert(model)  # warm-up

    profile = cProfile.Profile()
    seconds, steps = [], []
    for request in requests[1:]:
        start = time.perf_counter()
        profile.enable()
        edit = editor.apply(model, tokenizer, [request], config)
        profile.disable()
        seconds.append(time.perf_counter() - start)
        steps.append(edit.info["v_steps"])
        edit.revert(model)
    total = sum(seconds)
    median = sorted(seconds)[len(seconds) // 2] if len(seconds) % 2 else sum(sorted(seconds)[len(seconds) // 2 - 1 : len(seconds) // 2 + 1]) / 2
    print(f"{len(seconds)} edits: median {median:.2f} s/edit, mean {total / len(seconds):.2f} (min {min(seconds):.2f}, max {max(seconds):.2f}); value steps {steps}")

    stats = pstats.Stats(profile)
    parts = {
        "frozen prefix (prefix KV cache + unedited suffix pass)": ("prefix.py", "__init__"),
        "forward from the edited block up": ("prefix.py", "hidden"),
        "backward": ("_tensor.py", "backward"),
        "unembedding at loss positions": ("lm.py", "unembed"),
        "rank-one update (solve with C)": ("~", "linalg_solve"),
    }
    for label, (file_part, func) in parts.items():
        spent = sum(v[3] for (file, _, name), v in stats.stats.items() if file.endswith(file_part) and (name == func or (file == "~" and func in name)))
        print(f"  {label:<58} {spent:7.2f} s  {100 * spent / total:5.1f}%")


if __name__ == "__main__":
    main()
