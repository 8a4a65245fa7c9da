"""Every metric against values computed by hand, functional against Metric, and state merging."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import tensor

from factedit.metrics import (
    PROTOCOLS,
    LocalityAgreement,
    NGramEntropy,
    ProbabilityComparison,
    TokenAccuracy,
    harmonic_mean,
    locality_agreement,
    mean_ngram_entropy,
    ngram_entropy,
    probability_comparison,
    token_accuracy,
    word_tokenize,
)

E = math.exp


def compute_quietly(metric):
    """``compute()`` without torchmetrics' warning about computing before any update."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute()


# --------------------------------------------------------------------------------------------
# Token protocol
# --------------------------------------------------------------------------------------------


def test_token_accuracy_hand_values():
    # one prompt: 2 of 3 positions right
    assert token_accuracy([tensor([1, 2, 3])], [tensor([1, 2, 4])]) == pytest.approx(2 / 3)
    # two prompts, 2/3 and 1/1: the case is the mean over prompts, (2/3 + 1) / 2 = 5/6,
    # not the pooled 3/4 over all four positions
    assert token_accuracy([tensor([1, 2, 3]), tensor([7])], [tensor([1, 2, 4]), tensor([7])]) == pytest.approx(5 / 6)
    assert token_accuracy([tensor([5, 6])], [tensor([0, 0])]) == 0.0


def test_token_accuracy_empty_and_errors():
    assert token_accuracy([], []) is None
    with pytest.raises(ValueError, match="pair up"):
        token_accuracy([tensor([1])], [])
    with pytest.raises(ValueError, match="positions"):
        token_accuracy([tensor([1, 2])], [tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="1-D"):
        token_accuracy([tensor([[1, 2]])], [tensor([[1, 2]])])
    with pytest.raises(ValueError, match="no answer positions"):
        token_accuracy([tensor([], dtype=torch.long)], [tensor([], dtype=torch.long)])


def test_token_accuracy_metric_is_macro_average():
    metric = TokenAccuracy()
    metric.update([tensor([1, 2, 3])], [tensor([1, 2, 4])])  # case 1: 2/3
    metric.update([tensor([4, 4]), tensor([9])], [tensor([4, 4]), tensor([9])])  # case 2: 1.0
    metric.update([], [])  # case 3: no prompts, skipped rather than counted as 0
    # (2/3 + 1) / 2 = 5/6
    assert metric.compute().item() == pytest.approx(5 / 6)
    assert int(metric.cases) == 2


def test_locality_agreement_hand_values():
    post = [tensor([3, 8, 5, 5]), tensor([2])]
    pre = [tensor([3, 8, 1, 5]), tensor([9])]
    # prompt 1 agrees on 3 of 4 positions, prompt 2 on 0 of 1: (3/4 + 0) / 2 = 3/8
    assert locality_agreement(post, pre) == pytest.approx(3 / 8)
    assert locality_agreement([], []) is None
    metric = LocalityAgreement()
    metric.update(post, pre)
    metric.update([tensor([1, 1])], [tensor([1, 1])])  # 1.0
    assert metric.compute().item() == pytest.approx((3 / 8 + 1.0) / 2)


@pytest.mark.parametrize(
    ("metric_cls", "function"), [(TokenAccuracy, token_accuracy), (LocalityAgreement, locality_agreement)]
)
def test_token_metric_equals_function_for_one_case(metric_cls, function):
    torch.manual_seed(0)
    a = [torch.randint(0, 3, (n,)) for n in (1, 4, 7)]
    b = [torch.randint(0, 3, (n,)) for n in (1, 4, 7)]
    metric = metric_cls()
    metric.update(a, b)
    assert metric.compute().item() == function(a, b)


# --------------------------------------------------------------------------------------------
# Probability protocol
# --------------------------------------------------------------------------------------------


def test_probability_comparison_expect_new_hand_values():
    # prompt 1: 0.5 < 1.0 succeeds; prompt 2: 2.0 < 1.0 fails -> ES = 1/2
    success, magnitude = probability_comparison(tensor([0.5, 2.0]), tensor([1.0, 1.0]), expect="new")
    assert success == pytest.approx(0.5)
    assert magnitude == pytest.approx(((E(-0.5) - E(-1.0)) + (E(-2.0) - E(-1.0))) / 2)


def test_probability_comparison_expect_true_hand_values():
    # neighborhood: the true target should stay more likely. prompt 1: 1.0 < 0.5 fails;
    # prompt 2: 1.0 < 2.0 succeeds -> NS = 1/2, NM = mean of exp(-nll_true) - exp(-nll_new)
    success, magnitude = probability_comparison(tensor([0.5, 2.0]), tensor([1.0, 1.0]), expect="true")
    assert success == pytest.approx(0.5)
    assert magnitude == pytest.approx(((E(-1.0) - E(-0.5)) + (E(-1.0) - E(-2.0))) / 2)


def test_probability_comparison_ties_fail_both_ways():
    for expect in ("new", "true"):
        success, magnitude = probability_comparison(tensor([1.5, 0.25]), tensor([1.5, 0.25]), expect=expect)
        assert success == 0.0
        assert magnitude == 0.0


def test_probability_comparison_empty_and_errors():
    assert probability_comparison(tensor([]), tensor([]), expect="new") is None
    with pytest.raises(ValueError, match="expect"):
        probability_comparison(tensor([1.0]), tensor([2.0]), expect="old")
    with pytest.raises(ValueError, match="equal length"):
        probability_comparison(tensor([1.0]), tensor([2.0, 3.0]), expect="new")
    with pytest.raises(ValueError, match="expect"):
        ProbabilityComparison(expect="both")


def test_probability_metric_is_macro_average():
    metric = ProbabilityComparison(expect="new")
    metric.update(tensor([0.5, 2.0]), tensor([1.0, 1.0]))  # success 1/2
    metric.update(tensor([0.1]), tensor([3.0]))  # success 1
    metric.update(tensor([]), tensor([]))  # skipped
    result = metric.compute()
    assert set(result) == {"success", "magnitude"}
    assert result["success"].item() == pytest.approx((0.5 + 1.0) / 2)
    case1 = ((E(-0.5) - E(-1.0)) + (E(-2.0) - E(-1.0))) / 2
    case2 = E(-0.1) - E(-3.0)
    assert result["magnitude"].item() == pytest.approx((case1 + case2) / 2)


@pytest.mark.parametrize("expect", ["new", "true"])
def test_probability_metric_equals_function_for_one_case(expect):
    torch.manual_seed(1)
    nll_new, nll_true = torch.rand(5) * 4, torch.rand(5) * 4
    metric = ProbabilityComparison(expect=expect)
    metric.update(nll_new, nll_true)
    result = metric.compute()
    success, magnitude = probability_comparison(nll_new, nll_true, expect=expect)
    assert result["success"].item() == success
    assert result["magnitude"].item() == magnitude


def test_harmonic_mean_hand_values():
    # 3 / (1/0.5 + 1/1 + 1/1) = 3 / 4
    assert harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(0.75)
    assert harmonic_mean([tensor(0.5), tensor(1.0), tensor(1.0)]) == pytest.approx(0.75)
    assert harmonic_mean([0.0, 1.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([float("nan"), 1.0, 1.0]))
    assert math.isnan(harmonic_mean([float("nan"), 0.0, 1.0]))  # unknown beats zero
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([-0.5, 1.0])


# --------------------------------------------------------------------------------------------
# Generation protocol
# --------------------------------------------------------------------------------------------


def test_word_tokenize_keeps_case_and_splits_punctuation():
    assert word_tokenize("Paris, France's capital.") == ["Paris", ",", "France", "'", "s", "capital", "."]


def test_ngram_entropy_hand_values():
    # "the cat sat on the cat": 6 words.
    # bigrams (5): (the cat) x2, (cat sat), (sat on), (on the) -> p = 2/5, 1/5, 1/5, 1/5
    #   H2 = 2/5 log2(5/2) + 3 * 1/5 log2(5) = 0.4 * 1.32193 + 0.6 * 2.32193 = 1.92193 bits
    # trigrams (4): all distinct -> H3 = log2(4) = 2 bits
    # score = (2/3 * H2 + 4/3 * H3) / 2 = (1.28129 + 2.66667) / 2 = 1.97398
    h2 = 0.4 * math.log2(2.5) + 0.6 * math.log2(5)
    h3 = 2.0
    assert ngram_entropy("the cat sat on the cat") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("the cat sat on the cat") == pytest.approx(1.97398, abs=1e-5)


def test_ngram_entropy_counts_punctuation_and_case():
    # "The cat sat. The cat sat." -> The cat sat . The cat sat .  (8 tokens)
    # bigrams (7): (The cat) x2, (cat sat) x2, (sat .) x2, (. The) x1
    #   H2 = 3 * 2/7 log2(7/2) + 1/7 log2(7)
    # trigrams (6): (The cat sat) x2, (cat sat .) x2, (sat . The) x1, (. The cat) x1
    #   H3 = 2 * 2/6 log2(3) + 2 * 1/6 log2(6)
    h2 = 3 * (2 / 7) * math.log2(7 / 2) + (1 / 7) * math.log2(7)
    h3 = 2 * (2 / 6) * math.log2(3) + 2 * (1 / 6) * math.log2(6)
    assert ngram_entropy("The cat sat. The cat sat.") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # no lower-casing: "A a A" has two distinct bigrams (A a), (a A) -> H2 = 1 bit,
    # while "a a a" has (a a) twice -> H2 = 0
    assert ngram_entropy("A a A", ns=(2,), weights=(1.0,)) == pytest.approx(1.0)
    assert ngram_entropy("a a a", ns=(2,), weights=(1.0,)) == 0.0


def test_ngram_entropy_short_texts_contribute_zero():
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("hello") == 0.0
    # two words: one bigram (H2 = 0) and no trigram (H3 = 0)
    assert ngram_entropy("hello world") == 0.0
    # three distinct words: two bigrams (H2 = 1 bit), one trigram (H3 = 0) -> (2/3 * 1 + 0) / 2
    assert ngram_entropy("one two three") == pytest.approx(1 / 3)


def test_ngram_entropy_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="weight"):
        ngram_entropy("a b c", ns=(2, 3), weights=(1.0,))
    with pytest.raises(ValueError, match="weight"):
        NGramEntropy(ns=(2,), weights=(1.0, 2.0))


def test_ngram_entropy_metric_is_macro_average():
    texts_case1 = ["one two three", "a a a"]  # (1/3 + 0) / 2 = 1/6
    texts_case2 = ["the cat sat on the cat"]
    assert mean_ngram_entropy(texts_case1) == pytest.approx(1 / 6)
    assert mean_ngram_entropy([]) is None
    with pytest.raises(TypeError):
        mean_ngram_entropy("a single string")
    metric = NGramEntropy()
    metric.update(texts_case1)
    metric.update(texts_case2)
    metric.update([])  # skipped
    expected = (1 / 6 + ngram_entropy("the cat sat on the cat")) / 2
    assert metric.compute().item() == pytest.approx(expected)
    single = NGramEntropy()
    single.update(texts_case2)
    assert single.compute().item() == mean_ngram_entropy(texts_case2)


# --------------------------------------------------------------------------------------------
# Shared behaviour
# --------------------------------------------------------------------------------------------


CASES = {
    "token": (
        TokenAccuracy,
        {},
        [
            ([tensor([1, 2, 3])], [tensor([1, 2, 4])]),
            ([tensor([4, 4]), tensor([9])], [tensor([4, 4]), tensor([8])]),
            ([], []),
            ([tensor([0])], [tensor([0])]),
        ],
    ),
    "locality": (
        LocalityAgreement,
        {},
        [
            ([tensor([3, 8, 5, 5])], [tensor([3, 8, 1, 5])]),
            ([tensor([1])], [tensor([2])]),
            ([], []),
            ([tensor([6, 7]), tensor([5])], [tensor([6, 0]), tensor([5])]),
        ],
    ),
    "probability": (
        ProbabilityComparison,
        {"expect": "true"},
        [
            (tensor([0.5, 2.0]), tensor([1.0, 1.0])),
            (tensor([3.0]), tensor([0.2])),
            (tensor([]), tensor([])),
            (tensor([1.0, 1.0, 0.1]), tensor([1.0, 0.5, 2.0])),
        ],
    ),
    "fluency": (
        NGramEntropy,
        {},
        [(["one two three", "a a a"],), ([],), (["the cat sat on the cat"],), (["The cat sat. The cat sat."],)],
    ),
}


def _as_floats(result):
    if isinstance(result, dict):
        return {k: v.item() for k, v in result.items()}
    return result.item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_states_equal_one_metric(name):
    metric_cls, kwargs, cases = CASES[name]
    whole = metric_cls(**kwargs)
    for case in cases:
        whole.update(*case)

    # split the cases between two metrics (two processes, say) and merge them back
    first, second = metric_cls(**kwargs), metric_cls(**kwargs)
    for case in cases[:2]:
        first.update(*case)
    for case in cases[2:]:
        second.update(*case)
    first.merge_state(second)
    assert _as_floats(first.compute()) == pytest.approx(_as_floats(whole.compute()))

    # merging a state dict, as gathered from another process, works the same way
    third, fourth = metric_cls(**kwargs), metric_cls(**kwargs)
    for case in cases[:1]:
        third.update(*case)
    for case in cases[1:]:
        fourth.update(*case)
    third.merge_state(fourth.metric_state)
    assert _as_floats(third.compute()) == pytest.approx(_as_floats(whole.compute()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_states_are_summed_across_processes(name):
    metric_cls, kwargs, _ = CASES[name]
    metric = metric_cls(**kwargs)
    assert metric._reductions, "no states registered"
    for key, reduce_fn in metric._reductions.items():
        # add_state(..., dist_reduce_fx="sum") registers torchmetrics' dim_zero_sum
        assert reduce_fn is not None and reduce_fn.__name__ == "dim_zero_sum", key


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_cases_gives_nan(name):
    metric_cls, kwargs, cases = CASES[name]
    empty_case = next(case for case in cases if len(case[0]) == 0)
    untouched = metric_cls(**kwargs)
    only_skipped = metric_cls(**kwargs)
    only_skipped.update(*empty_case)
    for metric in (untouched, only_skipped):
        result = _as_floats(compute_quietly(metric))
        values = result.values() if isinstance(result, dict) else [result]
        assert all(math.isnan(v) for v in values)


def test_probability_metric_refuses_to_merge_other_expectation():
    es, ns = ProbabilityComparison(expect="new"), ProbabilityComparison(expect="true")
    ns.update(tensor([1.0]), tensor([0.5]))
    with pytest.raises(ValueError, match="expect"):
        es.merge_state(ns)


def test_protocols():
    assert TokenAccuracy.protocol == "token"
    assert LocalityAgreement.protocol == "token"
    assert ProbabilityComparison.protocol == "probability"
    assert NGramEntropy.protocol == "generation"
    assert {key for key, protocol in PROTOCOLS.items() if protocol == "token"} == {
        "reliability",
        "generalization",
        "locality",
        "portability",
    }
    assert {key for key, protocol in PROTOCOLS.items() if protocol == "probability"} == {
        "es",
        "ps",
        "ns",
        "score",
        "em",
        "pm",
        "nm",
    }
    assert {key for key, protocol in PROTOCOLS.items() if protocol == "generation"} == {
        "fluency",
        "gen_reliability_em",
        "gen_reliability_contains",
        "gen_generalization_em",
        "gen_generalization_contains",
        "gen_portability_em",
        "gen_portability_contains",
    }
    assert {key for key, protocol in PROTOCOLS.items() if protocol == "efficiency"} == {
        "seconds_per_edit",
        "peak_memory_mb",
    }


def test_every_score_is_one_row_that_names_its_metric_protocol_and_case_score():
    """The table of scores drives per-case scores, the run's accumulators and the report: each
    row's per-case score is its metric class's, and accumulating one case gives that value."""
    from factedit.evaluation.report import LABELS, ROWS
    from factedit.evaluation.scoring import RunMetrics
    from factedit.metrics import SCORES, score_of

    assert [key for key, _ in ROWS] == [score.key for score in SCORES]
    assert all(LABELS[score.key] == score.label for score in SCORES)
    stages = RunMetrics().stages
    assert set(stages["post"]) == {score.key for score in SCORES if not score.derived}
    assert set(stages["pre"]) == set(stages["post"]) - {"locality"}
    for score in SCORES:
        assert PROTOCOLS[score.key] == score.metric.protocol
    predictions, targets = [torch.tensor([1, 2, 3])], [torch.tensor([1, 2, 4])]
    row = score_of("portability_multi_hop")
    assert row.protocol == "token" and row.case_score(predictions, targets) == pytest.approx(2 / 3)
    metric = row.accumulator()
    metric.update(predictions, targets)
    assert float(metric.compute()) == pytest.approx(2 / 3)
    es = score_of("es")
    success, magnitude = es.case_score(torch.tensor([1.0]), torch.tensor([2.0]))  # new target more likely
    assert success == 1.0 and magnitude > 0
