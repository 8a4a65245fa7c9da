"""Time one MEMIT-family call on many edits, and check that it took (ES on the edit prompts).

    python scripts/bench_memit_scale.py --edits 1000 [--method memit] [--lambdas 1000 1500 500]

Prints the seconds of the preparation (statistics, prefixes), of the editing call, and ES: the
share of edit prompts on which the edited model prefers the new target to the true one. Other
scores need the full evaluation (``edit.py --mode batch --edits_per_call N``), which costs far more
than the edit itself on a CPU.

With several ``--lambdas`` (MEMIT's lambda, ``mom2_update_weight``), the first is the timed call;
the edit is then reverted and solved again with each further value, reusing the first call's
target vectors (they do not depend on lambda), so the further lines time only the layer updates.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/counterfact/counterfact_test.json"))
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--method", default="memit")
    parser.add_argument("--lambdas", type=float, nargs="*", default=[], help="mom2_update_weight values; default: the config's")
    parser.add_argument("--es-batch", type=int, default=16, help="requests per ES scoring pass")
    args = parser.parse_args()

    from factedit.datamodules.records import load_requests
    from factedit.editors import get_editor
    from factedit.editors.core.lm import model_device
    from factedit.evaluation.efficiency import measure
    from factedit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    requests = load_requests(args.data, limit=args.edits)
    editor_cls = get_editor(args.method)
    editor = editor_cls()
    base_config = editor_cls.config_class()
    lambdas = args.lambdas or [base_config.mom2_update_weight]
    start = time.perf_counter()
    editor.prepare(model, tokenizer, base_config)
    prepared = time.perf_counter() - start
    print(f"{args.method}: prepare {prepared:.1f} s; threads {torch.get_num_threads()}", flush=True)

    computed_goals = editor.goals
    memo: list = []

    def goals(*a, **k):  # the target vectors do not depend on lambda: compute them once
        if not memo:
            start = time.perf_counter()
            memo.append(computed_goals(*a, **k))
            memo.append(time.perf_counter() - start)
        z, read_at, info = memo[0]
        return z, read_at, dict(info)

    editor.goals = goals
    device = model_device(model)
    for index, lam in enumerate(lambdas):
        config = replace(base_config, mom2_update_weight=lam)
        with measure(device) as cost:
            edit = editor.apply(model, tokenizer, requests, config)
        es = edit_success(model, tokenizer, requests, args.es_batch)
        steps = edit.info.get("v_steps", [])
        what = "edits in one call" if index == 0 else "edits, re-solved with the same target vectors"
        print(f"{args.method} lambda {lam:g}: {len(requests)} {what}: {cost.seconds:.0f} s ({cost.seconds / len(requests):.2f} s/edit; target vectors {memo[1]:.0f} s), "
              f"peak {cost.peak_memory_mb:.0f} MB; ES {es:.3f}; mean value steps {sum(steps) / max(1, len(steps)):.1f}", flush=True)
        edit.revert(model)


def edit_success(model, tokenizer, requests, batch: int) -> float:
    """Share of requests whose edit prompt gives the new target a lower NLL than the true one."""
    from factedit.evaluation.scoring import score_pairs

    pairs = [(r.prompt, t) for r in requests for t in (r.target_new, r.target_true)]
    nll = [s["nll"] for s in score_pairs(model, tokenizer, pairs, batch_size=2 * batch)]
    return sum(new < true for new, true in zip(nll[::2], nll[1::2])) / len(requests)


if __name__ == "__main__":
    main()
