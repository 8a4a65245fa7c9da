"""Benchmark of the locate-then-edit methods on CounterFact with the default model.

For each method, runs ``edit.py`` on the first ``--limit`` records (ROME and KN one edit at a
time; MEMIT, PMET and AlphaEdit with every edit in one call), fluency off, and prints the
probability-protocol scores (ES/PS/NS/S), the token-protocol scores (reliability,
generalization, locality), the median seconds per edit call and per edit, and peak memory.
The one-time cost of the key statistics (sampling the corpus from the model and the pass over
it) is measured separately, into a temporary cache, and reported on its own line: the runs
themselves use the warm cache, as every run after the first does.

    python scripts/bench_locate.py --limit 200 --methods rome memit pmet alphaedit kn

Runs resume: a method whose output folder already holds a finished run is only re-read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH_METHODS = {"memit", "pmet", "alphaedit"}
PROBABILITY = ("es", "ps", "ns", "score")
TOKEN = ("reliability", "generalization", "locality")


def statistics_cost(model_name: str, methods: list[str]) -> list[str]:
    """Time the corpus sampling and the key-statistics pass for each method's layers, cold."""
    from factedit.editors import get_editor
    from factedit.editors.core.corpus import open_corpus
    from factedit.editors.core.stats import layer_statistics
    from factedit.models import model_fingerprint
    from factedit.editors.core.targets import get_targets
    from factedit.models import load_model

    model, tokenizer = load_model(model_name)
    targets = get_targets(model)
    lines = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FACTEDIT_CACHE"] = cache
        try:
            config = get_editor("rome").config_class()
            start = time.perf_counter()
            open_corpus(config.stats_corpus, model, tokenizer, config.stats_samples, length=config.stats_max_length, model_id=model_fingerprint(model), progress=False).load()
            sampled = time.perf_counter() - start
            lines.append(f"corpus '{config.stats_corpus}': {config.stats_samples} texts x {config.stats_max_length} tokens in {sampled:.1f} s (once per model)")
            for method in methods:
                if method == "kn":
                    continue
                config = get_editor(method).config_class()
                layers = getattr(config, "layers", None) or [config.layer]
                names = [targets.layer("mlp_out", l) for l in layers]
                for path in (Path(cache) / "stats").glob("*.safetensors"):
                    path.unlink()
                start = time.perf_counter()
                layer_statistics(model, tokenizer, names, corpus=config.stats_corpus, n_texts=config.stats_samples, max_length=config.stats_max_length, progress=False)
                lines.append(f"{method}: statistics of layers {layers} in {time.perf_counter() - start:.1f} s (once per model and layer set)")
        finally:
            del os.environ["FACTEDIT_CACHE"]
    return lines


def run_method(method: str, data: str, limit: int, out: Path, model_name: str) -> dict:
    from factedit.evaluation.cli import main

    argv = ["--editor", method, "--model", model_name, "--data", data, "--limit", str(limit), "--eval.fluency", "false", "--progress", "false", "--out", str(out)]
    if method in BATCH_METHODS:
        argv += ["--mode", "batch", "--edits_per_call", str(limit)]
    start = time.perf_counter()
    main(argv)
    summary = json.loads((out / "summary.json").read_text())
    summary["bench_wall_seconds"] = time.perf_counter() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rome", "memit", "pmet", "alphaedit", "kn"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/counterfact/counterfact_test.json"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/bench_locate")
    parser.add_argument("--skip-statistics-cost", action="store_true", help="do not time the statistics from a cold cache")
    args = parser.parse_args()

    stats_lines = [] if args.skip_statistics_cost else statistics_cost(args.model, args.methods)
    results = {}
    for method in args.methods:
        results[method] = run_method(method, args.data, args.limit, Path(args.out) / f"{method}_{args.limit}", args.model)

    header = ["method", "mode", *PROBABILITY, *TOKEN, "s/call (median)", "s/edit", "peak MB"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    pre = None
    for method, summary in results.items():
        m = summary["metrics"]
        pre = pre or m
        # seconds_per_edit is already per request (a batch call's time divided by its requests)
        per_edit = m.get("median_seconds_per_edit", float("nan"))
        per_call = per_edit * (summary.get("edits_per_call") or 1) if summary["mode"] == "batch" else per_edit
        mode = f"{summary['mode']} x{summary.get('edits_per_call')}" if summary["mode"] == "batch" else summary["mode"]
        cells = [method, mode, *(f"{m.get(k, float('nan')):.3f}" for k in PROBABILITY + TOKEN), f"{per_call:.2f}", f"{per_edit:.2f}", f"{m.get('peak_memory_mb', float('nan')):.0f}"]
        print(" | ".join(cells))
    if pre:
        cells = ["unedited", "-", *(f"{pre.get('pre_' + k, float('nan')):.3f}" for k in PROBABILITY + TOKEN[:2]), "-", "-", "-", "-"]
        print(" | ".join(cells))
    for line in stats_lines:
        print("statistics:", line)


if __name__ == "__main__":
    main()
