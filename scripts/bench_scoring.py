"""Where the time of an ``edit.py`` case goes: editing against scoring, and the cost of decoding.

    python scripts/bench_scoring.py [--editor ft_m] [--limit 5] [--data counterfact-demo]

Runs ``edit.py``'s loop (single mode, full scoring, as the README's first command does) on the
first ``--limit`` cases with timers around each scoring stage, and prints per case: seconds of the
edit itself (an editor that computes a chunk's edits together, FT, shares that call's time out;
``--alone`` edits one case at a time), of teacher-forced scoring (all probes, pre + post), of fluency generation and of
generation scoring (greedy answers). Then times greedy decoding alone on the unedited model in
milliseconds per new token and sequence, at batch 1 and at ``--batch``, with the bytes of weights
one decoding step reads: one sequence is bound by memory bandwidth, not arithmetic (one step
reads every weight once, 540 MB for the default model in float32), so only batching sequences
lowers the cost per sequence.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from factedit.evaluation import scoring  # noqa: E402

TIMED = {"score_pairs": "teacher-forced", "generate_texts": "fluency", "measure_generations": "generation scoring"}


def with_timer(fn, totals: dict[str, float], label: str):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    return timed


@torch.no_grad()
def decode_ms_per_token(model, tokenizer, batch: int, new_tokens: int = 32) -> float:
    """Milliseconds per new token and sequence of greedy decoding with the KV cache, on the
    model's device (a GPU is synchronised before the clock is read)."""
    from factedit.editors.core.lm import model_device

    device = model_device(model)
    prompts = ["The mother tongue of Danielle Darrieux is"] * batch
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    tokenizer.padding_side = side
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    model.generate(**inputs, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.generate(**inputs, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / (new_tokens * batch) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--editor", default="ft_m")
    parser.add_argument("--data", default="counterfact-demo")
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--case_batch", type=int, default=None, help="cases measured together (default: EvalConfig's)")
    parser.add_argument("--alone", action="store_true", help="make each edit alone (eval.edit_together false), not a chunk's edits in one call")
    args = parser.parse_args()

    from factedit.datamodules import load_requests
    from factedit.editors import get_editor
    from factedit.models import load_model
    from factedit.evaluation.runner import EditRun

    model, tokenizer = load_model(args.model)
    totals: dict[str, float] = defaultdict(float)
    for name, label in TIMED.items():
        setattr(scoring, name, with_timer(getattr(scoring, name), totals, label))
    editor = get_editor(args.editor)()
    requests = load_requests(args.data, limit=args.limit)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        from factedit.evaluation.config import EvalConfig

        eval_config = EvalConfig(edit_together=not args.alone, **({} if args.case_batch is None else {"case_batch": args.case_batch}))
        run = EditRun(model, tokenizer, editor, editor.config_class(), requests, Path(out), eval_config=eval_config, progress=False)
        summary = run.run()
        wall = time.perf_counter() - start
        import json

        edit_seconds = [json.loads(line)["seconds"] for line in (Path(out) / "cases.jsonl").read_text().splitlines()]
    n = len(requests)
    print(f"{args.editor} on {n} cases of {args.data}: {wall:.1f} s wall, {wall / n:.1f} s per case")
    together = summary.get("edits_computed_together", 1)
    print(f"  editing            {sum(edit_seconds) / n:7.2f} s per case" + (f" (up to {together} edits computed together)" if together > 1 else ""))
    for label in TIMED.values():
        print(f"  {label:<18} {totals[label] / n:7.2f} s per case (before and after the edit)")
    other = wall - sum(edit_seconds) - sum(totals.values())
    print(f"  everything else    {other / n:7.2f} s per case (loading, reverting, bookkeeping)")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(f"greedy decoding, unedited model ({weights:.0f} MB of weights read per step), {torch.get_num_threads()} thread(s):")
    for batch in (1, args.batch):
        print(f"  batch {batch:>3}: {decode_ms_per_token(model, tokenizer, batch):6.1f} ms per new token and sequence")


if __name__ == "__main__":
    main()
