"""Generation scores of the unedited model under each prompt format and answer budget.

An instruction-tuned model asked a bare question often ends its turn at once, so its generation
scores (``gen_*``: greedy answers matched against the accepted answers) are near zero before any
edit. This prints, for the first ``--limit`` records of a data file and each combination of
``--chat-template`` and ``--budget``, the mean exact match and containment of the edit prompts
(reliability), rephrasings (generalization) and portability questions, the share of empty
answers, and the seconds taken:

    OMP_NUM_THREADS=1 python scripts/bench_generation.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json \\
        --limit 100 --chat-template off on --budget target open
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from factedit.datamodules.records import load_requests
    from factedit.evaluation.config import EvalConfig
    from factedit.models import DEFAULT_MODEL, load_model
    from factedit.evaluation.scoring import GENERATION_GROUPS as groups
    from factedit.evaluation.generation import measure_generation
    from factedit.evaluation.scoring import GENERATION_SCORES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default=None)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--chat-template", nargs="+", default=["off", "on"], choices=["off", "on", "auto"])
    parser.add_argument("--budget", nargs="+", default=["target", "open"], choices=["target", "open"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    requests = load_requests(args.data, format=args.format, limit=args.limit)
    print(f"model {args.model}, {len(requests)} records of {args.data}, at most {args.max_new_tokens} new tokens", flush=True)
    header = "".join(f"{g[:5] + ' em':>11}{g[:5] + ' cont':>12}" for g in groups)
    print(f"{'chat':<6}{'budget':<8}{header}{'empty':>8}{'s':>7}", flush=True)
    for chat in args.chat_template:
        for budget in args.budget:
            config = EvalConfig(generation_max_new_tokens=args.max_new_tokens, generation_budget=budget, chat_template=chat)
            tick = time.perf_counter()
            sums = {(g, m): [0.0, 0] for g in groups for m in GENERATION_SCORES}
            answers = empty = 0
            for request in requests:
                generation = measure_generation(model, tokenizer, request, config)
                for group in groups:
                    items = generation[group]
                    texts, accepted = [i["text"] for i in items], [i["answers"] for i in items]
                    for metric, function in GENERATION_SCORES.items():
                        value = function(texts, accepted)
                        if value is not None:
                            sums[group, metric][0] += value
                            sums[group, metric][1] += 1
                    answers += len(texts)
                    empty += sum(not text.strip() for text in texts)
            row = "".join(
                f"{sums[g, m][0] / max(sums[g, m][1], 1):>{11 if m == 'em' else 12}.3f}" for g in groups for m in GENERATION_SCORES
            )
            print(f"{chat:<6}{budget:<8}{row}{empty / max(answers, 1):>8.3f}{time.perf_counter() - tick:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
