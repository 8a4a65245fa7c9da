"""Benchmark of the general-ability suite (evaluation/general.py) on the default model.

Loads the model once, runs the suite on it in memory one task at a time, and prints for each
task, as soon as it is done: its scores, the number of items, of lm-eval requests (one per
multiple-choice option, per document for rolling perplexity, per prompt for generation), of tokens
the model read for log-likelihoods, the seconds spent in the model and the wall-clock seconds of
the call (data preparation and lm-eval's own work are the difference); then the totals.

    OMP_NUM_THREADS=1 python scripts/bench_general.py --tasks hellaswag arc_easy piqa mmlu wikitext --limit 100

Safety (refusal of harmful requests, over-refusal of XSTest's safe prompts), plain and under the
model's chat template (answers and prompts are never printed, only the rates):

    OMP_NUM_THREADS=1 python scripts/bench_general.py --tasks advbench xstest --limit 100 --chat-template off on
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from factedit.evaluation.general import HEADLINE, TASKS, GeneralConfig, run_general
    from factedit.models import DEFAULT_MODEL, load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "arc_easy", "piqa", "mmlu", "wikitext"], choices=TASKS)
    parser.add_argument("--limit", type=int, default=100, help="items per task (0: all)")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--fewshot-preset", default=None, choices=["paper"], help="per-task shots of the seed paper (MMLU 5, BBH 3, GSM8K 8, ...)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--safety-dir", default=None)
    parser.add_argument("--chat-template", nargs="+", default=["off"], choices=["off", "on", "auto"], help="one run of the tasks per setting")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("factedit.evaluation").setLevel(logging.INFO)

    tick = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - tick
    limit = args.limit or None
    shots = f"{args.fewshot_preset} preset" if args.fewshot_preset else f"{args.num_fewshot}-shot"
    print(f"model {args.model} (loaded in {load_seconds:.1f} s), limit {limit}, {shots}, batch {args.batch_size}", flush=True)
    print(f"{'task':<24}{'headline':>26}  {'items':>6}{'requests':>10}{'tokens':>10}{'model s':>9}{'wall s':>8}  other metrics", flush=True)
    rows = []
    # One call per task, so that each line is printed as soon as its task is done.
    for task, chat in ((task, chat) for chat in args.chat_template for task in args.tasks):
        config = GeneralConfig(
            tasks=[task], limit=limit, data_dir=args.data_dir, safety_dir=args.safety_dir, batch_size=args.batch_size,
            num_fewshot=args.num_fewshot, fewshot_preset=args.fewshot_preset, seed=args.seed, chat_template=chat,
        )
        run = run_general(model, tokenizer, config)
        metric, _ = HEADLINE[task]
        scores, cost = run.scores[task], run.costs[task]
        others = ", ".join(f"{name}={value:.4g}" for name, value in scores.items() if name != metric)
        rows.append({"task": task, "chat_template": chat, "scores": scores, "items": run.items[task], "requests": cost.requests, "tokens": cost.tokens, "model_seconds": round(cost.seconds, 2), "wall_seconds": round(run.seconds, 2)})
        print(
            f"{task + ('' if chat == 'off' else ' (chat ' + chat + ')'):<24}{metric + ' ' + format(scores.get(metric, float('nan')), '.4f'):>26}  {run.items[task]:>6}{cost.requests:>10}{cost.tokens:>10}"
            f"{cost.seconds:>9.1f}{run.seconds:>8.1f}  {others}",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "limit": limit, "tasks": rows}, indent=2))
    total = {key: sum(row[key] for row in rows) for key in ("items", "requests", "tokens", "model_seconds", "wall_seconds")}
    print(f"{'total':<24}{'':>26}  {total['items']:>6}{total['requests']:>10}{total['tokens']:>10}{total['model_seconds']:>9.1f}{total['wall_seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
