"""Raw measurements, per-case scores and the run summary, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from factedit.editors.core.lm import collate_pairs, encode_pair, target_nll
from factedit.evaluation.scoring import EvalConfig, RunMetrics, case_scores, measure_case, score_pairs


def _record(pre: dict, post: dict, seconds: float = 1.0, memory: float = 10.0) -> dict:
    return {"case_id": "x", "pre": {"raw": pre}, "post": {"raw": post}, "seconds": seconds, "peak_memory_mb": memory}


def _raw(rel_pred, loc_pred, es, ps, ns, texts=None) -> dict:
    raw = {
        "reliability": [{"target": [1, 2], "pred": rel_pred}],
        "generalization": [{"target": [1, 2], "pred": [1, 2]}, {"target": [3], "pred": [4]}],
        "portability": [],
        "locality": [{"target": [5, 6], "pred": loc_pred}],
        "es": {"nll_new": es[0], "nll_true": es[1]},
        "ps": {"nll_new": ps[0], "nll_true": ps[1]},
        "ns": {"nll_new": ns[0], "nll_true": ns[1]},
    }
    if texts is not None:
        raw["fluency"] = {"texts": texts}
    return raw


def test_case_scores_by_hand():
    pre = _raw([1, 3], [5, 7], ([2.0], [1.0]), ([2.0, 0.5], [1.0, 1.0]), ([3.0, 0.5], [1.0, 1.0]))
    post = _raw([1, 2], [5, 6], ([0.5], [1.0]), ([0.5, 0.5], [1.0, 1.0]), ([0.5, 3.0], [1.0, 1.0]))
    s = case_scores(post, reference=pre)
    assert s["reliability"] == 1.0
    assert s["generalization"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["portability"] is None  # no portability probes
    assert s["locality"] == 0.5  # [5,6] vs unedited [5,7]
    assert s["es"] == 1.0 and s["ps"] == 1.0 and s["ns"] == 0.5
    assert s["em"] == pytest.approx(math.exp(-0.5) - math.exp(-1.0))
    assert s["nm"] == pytest.approx(((math.exp(-1) - math.exp(-0.5)) + (math.exp(-1) - math.exp(-3))) / 2)
    assert "locality" not in case_scores(pre)  # locality is relative to the unedited model


def test_run_summary_by_hand():
    pre1 = _raw([1, 3], [5, 6], ([2.0], [1.0]), ([2.0, 2.0], [1.0, 1.0]), ([3.0], [1.0]), texts=["a b a b"])
    post1 = _raw([1, 2], [5, 6], ([0.5], [1.0]), ([0.5, 2.0], [1.0, 1.0]), ([3.0], [1.0]), texts=["a b c d"])
    pre2 = _raw([0, 0], [8, 8], ([2.0], [1.0]), ([2.0, 2.0], [1.0, 1.0]), ([3.0], [1.0]))
    post2 = _raw([1, 0], [8, 9], ([2.0], [1.0]), ([0.5, 0.5], [1.0, 1.0]), ([0.5], [1.0]))
    metrics = RunMetrics()
    metrics.update(_record(pre1, post1, seconds=2.0, memory=100.0))
    metrics.update(_record(pre2, post2, seconds=4.0, memory=300.0))
    out = metrics.summary()
    assert out["reliability"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["pre_reliability"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["locality"] == pytest.approx((1.0 + 0.5) / 2)
    assert "pre_locality" not in out
    es, ps, ns = (1 + 0) / 2, (0.5 + 1.0) / 2, (1 + 0) / 2
    assert (out["es"], out["ps"], out["ns"]) == pytest.approx((es, ps, ns))
    assert out["score"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))
    assert out["pre_es"] == 0.0 and out["pre_score"] == 0.0
    # fluency: only case 1 has generations. "a b c d": 3 distinct bigrams, 2 distinct trigrams.
    expected = (2 / 3 * math.log2(3) + 4 / 3 * math.log2(2)) / 2
    assert out["fluency"] == pytest.approx(expected)
    assert out["seconds_per_edit"] == 3.0 and out["median_seconds_per_edit"] == 3.0
    assert out["peak_memory_mb"] == 300.0
    assert "portability" not in out  # nothing to score is absent, not zero


def test_score_pairs_matches_a_plain_forward(tiny_model, tokenizer):
    pairs = [("The capital of France is", "Paris"), ("Angola is located in", "Antarctica"), ("The capital of France is", "Rome")]
    scored = score_pairs(tiny_model, tokenizer, pairs, batch_size=2)
    for (prompt, target), got in zip(pairs, scored):
        p_ids, t_ids = encode_pair(tokenizer, prompt, target)
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0, len(p_ids) - 1 : -1]
        logp = torch.log_softmax(logits, -1)
        assert got["target"] == t_ids
        assert got["pred"] == logits.argmax(-1).tolist()
        assert got["nll"] == pytest.approx(-logp[range(len(t_ids)), t_ids].mean().item(), abs=1e-5)
    batch = collate_pairs([encode_pair(tokenizer, p, t) for p, t in pairs], tokenizer.pad_token_id)
    assert target_nll(tiny_model, batch).tolist() == pytest.approx([s["nll"] for s in scored], abs=1e-5)


def test_pairs_of_one_prompt_share_a_row_and_score_as_alone(tiny_model, tokenizer):
    """One-token targets of the same case and prompt are read off one row (half the rows for
    CounterFact's new/true pairs); a longer target carries its own row; another case's same
    prompt does not share (its row may run with another edit). Each pair's result equals its
    own plain forward."""
    france, angola = "The capital of France is", "Angola is located in"
    pairs = [(france, "Paris"), (france, "Rome"), (france, "English"), (france, "French"), (angola, "Antarctica"), (france, "Paris")]
    owners = [0, 0, 0, 0, 0, 1]
    lengths = [len(encode_pair(tokenizer, p, t)[1]) for p, t in pairs]
    assert lengths == [1, 1, 2, 1, 3, 1], "test premise: the tiny tokenizer's target lengths"
    rows = []
    handle = tiny_model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        scored = score_pairs(tiny_model, tokenizer, pairs, batch_size=8, owners=owners, select=lambda owners: None)
    finally:
        handle.remove()
    assert rows == [3]  # France + English (carrying Paris, Rome, French), Angola, case 1's France
    alone = [score_pairs(tiny_model, tokenizer, [pair])[0] for pair in pairs]
    for got, one in zip(scored, alone):
        assert got["target"] == one["target"] and got["pred"] == one["pred"]
        assert got["nll"] == pytest.approx(one["nll"], abs=1e-5)


def test_measure_case_is_repeatable_and_unedited_locality_is_perfect(tiny_model, tokenizer, request_factory):
    req = request_factory()
    config = EvalConfig(batch_size=4, generation_length=5)
    first = measure_case(tiny_model, tokenizer, req, config)
    second = measure_case(tiny_model, tokenizer, req, config)
    assert first == second  # same batches, same seed: bit-identical, so pre/post differ only by the edit
    assert set(first) >= {"reliability", "generalization", "portability", "locality", "es", "ps", "ns", "fluency"}
    assert case_scores(second, reference=first)["locality"] == 1.0
    assert len(first["fluency"]["texts"]) == 1 and first["fluency"]["texts"][0].startswith("Danielle Darrieux is")


def test_probability_groups_absent_without_true_target(tiny_model, tokenizer, request_factory):
    raw = measure_case(tiny_model, tokenizer, request_factory(target_true=None), EvalConfig(fluency=False))
    assert "es" not in raw and "fluency" not in raw
    assert case_scores(raw)["reliability"] is not None


def test_a_score_is_one_row_of_the_table(monkeypatch):
    """A new score computed from a measurement the cases already have is one row: here
    "rephrase exact" (token accuracy that counts only whole rephrases right), read from the
    generalization probes; case scores, the run's accumulators and the summary follow the row."""
    from factedit import metrics
    from factedit.evaluation import scoring
    from factedit.metrics.scores import SCORES, Score
    from factedit.metrics.token import TokenAccuracy

    for score in SCORES:
        assert score.derived == (score.reads is None) and (score.reads is None or score.reads[0] in scoring.MEASUREMENTS)

    class WholeAnswer(TokenAccuracy):
        @staticmethod
        def case_score(predictions, targets):
            return sum(bool(torch.equal(p, t)) for p, t in zip(predictions, targets)) / len(targets) if targets else None

    row = Score("gen_whole", WholeAnswer, "rephrased prompts: whole answer right", "Whole rephrase", reads=("tokens", "generalization"))
    monkeypatch.setattr(scoring, "SCORES", (*SCORES, row))
    pre = _raw([1, 3], [5, 7], ([2.0], [1.0]), ([2.0, 0.5], [1.0, 1.0]), ([3.0, 0.5], [1.0, 1.0]))
    post = _raw([1, 2], [5, 6], ([0.5], [1.0]), ([0.5, 0.5], [1.0, 1.0]), ([0.5, 3.0], [1.0, 1.0]))
    post["generalization"] = [{"target": [1, 2], "pred": [1, 2]}, {"target": [3, 4], "pred": [3, 5]}]
    assert case_scores(post, reference=pre)["gen_whole"] == 0.5  # token accuracy would say 0.75
    run = RunMetrics()
    run.update(_record(pre, post, seconds=1.0, memory=1.0))
    summary = run.summary()
    assert summary["gen_whole"] == 0.5 and summary["pre_gen_whole"] == 0.5 and summary["generalization"] == 0.75
    assert metrics.SCORES is SCORES  # the table itself is left as it was
