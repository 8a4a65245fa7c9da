"""Generation-based scoring: SQuAD-style matching by hand, greedy answers against model.generate,
the gen_* keys through case scores, the run summary and the report, and memory-based editors."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_request
from factedit.editors.base import QA
from factedit.editors.core.lm import encode_pair
from factedit.evaluation.report import summary_table
from factedit.evaluation.generation import GENERATION_MARGIN, greedy_continuations
from factedit.evaluation.scoring import EvalConfig, RunMetrics, case_scores, measure_case, protocols_of
from factedit.metrics import (
    PROTOCOLS,
    GenerationContains,
    GenerationExactMatch,
    generation_contains,
    generation_exact_match,
    normalize_answer,
)

# --------------------------------------------------------------------------------------------
# Matching, by hand
# --------------------------------------------------------------------------------------------


def test_normalize_answer_by_hand():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple a day, THE doctor...") == "apple day doctor"
    assert normalize_answer("Brasília.") == "brasília"
    assert normalize_answer("“Rome”—Italy") == "romeitaly"  # unicode punctuation goes too
    assert normalize_answer("A", articles=False) == "a"


def test_exact_match_and_containment_by_hand():
    continuations = [" Rome, Italy.", " the city of Rome", " Romeo and Juliet", " ROME"]
    answers = ["Rome", "Rome", "Rome", ["Paris", "rome."]]
    # prompt by prompt: EM 1, 0 (starts with "city"), 0 ("romeo" is another word), 1 (alias)
    assert generation_exact_match(continuations, answers) == pytest.approx(2 / 4)
    # containment: 1, 1, 0 (whole words only), 1
    assert generation_contains(continuations, answers) == pytest.approx(3 / 4)


def test_aliases_articles_and_punctuation():
    # the target's article and the continuation's are both dropped; any alias counts
    assert generation_exact_match([" The United States of America is"], [["the United States", "USA"]]) == 1.0
    assert generation_exact_match([" USA, of course"], [("the United States", "USA")]) == 1.0
    assert generation_exact_match([" America"], [("the United States", "USA")]) == 0.0
    assert generation_contains([" it is in the U.S.A."], [("United States", "U.S.A.")]) == 1.0
    # a multi-word answer must match as a whole
    assert generation_exact_match([" Washington state"], ["Washington, D.C."]) == 0.0
    assert generation_contains([" It is Washington D.C. of course"], ["Washington, D.C."]) == 1.0
    # an answer that is only an article keeps its article (and so does the continuation)
    assert generation_exact_match([" A. The first letter"], ["A"]) == 1.0
    assert generation_exact_match([" B"], ["A"]) == 0.0
    # an empty continuation (the model ended its turn at once) matches nothing
    assert generation_exact_match([""], ["Rome"]) == 0.0 and generation_contains([""], ["Rome"]) == 0.0


def test_empty_case_and_errors():
    assert generation_exact_match([], []) is None and generation_contains([], []) is None
    with pytest.raises(ValueError, match="pair up"):
        generation_exact_match(["a"], [])
    with pytest.raises(ValueError, match="no accepted answer"):
        generation_contains(["a"], [[]])
    with pytest.raises(ValueError, match="nothing left"):
        generation_exact_match(["a"], ["?!"])
    with pytest.raises(TypeError):
        generation_exact_match("Rome", ["Rome"])


def test_metrics_are_macro_averages_and_merge():
    cases = [
        ([" Rome is", " Paris"], ["Rome", "Rome"]),  # EM 1/2, contains 1/2
        ([], []),  # skipped
        ([" in Rome"], [["Rome", "Roma"]]),  # EM 0, contains 1
    ]
    em, contains = GenerationExactMatch(), GenerationContains()
    for case in cases:
        em.update(*case)
        contains.update(*case)
    assert em.compute().item() == pytest.approx((0.5 + 0.0) / 2)
    assert contains.compute().item() == pytest.approx((0.5 + 1.0) / 2)
    assert GenerationExactMatch.protocol == GenerationContains.protocol == "generation"
    first, second = GenerationContains(), GenerationContains()
    first.update(*cases[0])
    second.update(*cases[2])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(contains.compute().item())
    with pytest.warns(UserWarning):
        assert math.isnan(GenerationExactMatch().compute().item())


# --------------------------------------------------------------------------------------------
# Greedy answers on a tiny model
# --------------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Angola is located in", "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays"]


def _generate_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The reference: model.generate on the prompt alone (no padding), decoded up to the end of text."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_continuations_equal_model_generate(tiny_model, tokenizer, batch_size):
    budgets = [3, 5, 2, 4]
    got = greedy_continuations(tiny_model, tokenizer, PROMPTS, budgets, batch_size=batch_size)
    assert got == [_generate_alone(tiny_model, tokenizer, p, n) for p, n in zip(PROMPTS, budgets)]
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= n for text, n in zip(got, budgets))


def test_greedy_continuations_refuse_bad_budgets(tiny_model, tokenizer):
    assert greedy_continuations(tiny_model, tokenizer, [], []) == []
    with pytest.raises(ValueError, match="budgets"):
        greedy_continuations(tiny_model, tokenizer, PROMPTS, [1])
    with pytest.raises(ValueError, match="at least 1"):
        greedy_continuations(tiny_model, tokenizer, PROMPTS[:1], [0])
    with pytest.raises(ValueError, match="generation_max_new_tokens"):
        EvalConfig(generation_max_new_tokens=0)


def _knowedit_request():
    return make_request(
        target_new="Rome",
        portability=(
            QA("The capital of Italy is", "Rome", aliases=("Rome", "Roma"), kind="Reasoning"),
            QA("Angola is located in", "Africa", kind="Subject_Aliasing"),
        ),
    )


def test_measure_case_stores_continuations_and_scores_them(tiny_model, tokenizer):
    request = _knowedit_request()
    config = EvalConfig(batch_size=2, fluency=False, generation_max_new_tokens=4)
    raw = measure_case(tiny_model, tokenizer, request, config)
    generation = raw["generation"]
    assert [item["answers"] for item in generation["reliability"]] == [["Rome"]]
    assert [item["answers"] for item in generation["generalization"]] == [["Rome"]]
    assert [item["answers"] for item in generation["portability"]] == [["Rome", "Roma"], ["Africa"]]
    # each answer is what model.generate gives on its prompt alone, for its own token budget
    probes = [(request.prompt, ("Rome",)), (request.rephrase_prompts[0], ("Rome",)), *((q.prompt, (q.answer, *q.aliases)) for q in request.portability)]
    texts = [item["text"] for group in ("reliability", "generalization", "portability") for item in generation[group]]
    for (prompt, answers), text in zip(probes, texts):
        budget = min(max(len(encode_pair(tokenizer, prompt, a)[1]) for a in answers) + GENERATION_MARGIN, 4)
        assert text == _generate_alone(tiny_model, tokenizer, prompt, budget)
    scores = case_scores(raw)
    for group in ("reliability", "generalization", "portability"):
        items = generation[group]
        continuations, answers = [i["text"] for i in items], [i["answers"] for i in items]
        assert scores[f"gen_{group}_em"] == generation_exact_match(continuations, answers)
        assert scores[f"gen_{group}_contains"] == generation_contains(continuations, answers)
    # pre and post run the same code path: the same model gives the same raw measurements
    assert measure_case(tiny_model, tokenizer, request, config) == raw


def test_chat_template_and_open_budget(tiny_model, tokenizer):
    """With the chat template each prompt is asked as a user turn (the template's text given as is,
    no special tokens added again); with the open budget every answer may run to the cap."""
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
    request = _knowedit_request()
    config = EvalConfig(batch_size=2, fluency=False, generation_max_new_tokens=6, generation_budget="open", chat_template="on")
    generation = measure_case(tiny_model, chat, request, config)["generation"]
    texts = [item["text"] for group in ("reliability", "generalization", "portability") for item in generation[group]]
    prompts = [request.prompt, request.rephrase_prompts[0], *(q.prompt for q in request.portability)]
    assert texts == [_generate_alone(tiny_model, chat, f"<user>{p}</user><bot>", 6) for p in prompts]
    plain = measure_case(tiny_model, chat, request, EvalConfig(batch_size=2, fluency=False, generation_max_new_tokens=6, generation_budget="open"))
    assert [item["text"] for item in plain["generation"]["reliability"]] == [_generate_alone(tiny_model, chat, request.prompt, 6)]
    with pytest.raises(ValueError, match="no chat template"):
        measure_case(tiny_model, tokenizer, request, config)
    with pytest.raises(ValueError, match="generation_budget"):
        EvalConfig(generation_budget="long")
    with pytest.raises(ValueError, match="chat_template"):
        EvalConfig(chat_template="maybe")


def test_generation_scoring_can_be_turned_off(tiny_model, tokenizer):
    raw = measure_case(tiny_model, tokenizer, _knowedit_request(), EvalConfig(fluency=False, generation_scoring=False))
    assert "generation" not in raw
    assert not any(key.startswith("gen_") for key in case_scores(raw))


def test_a_model_that_says_the_target_scores_one(tiny_model, tokenizer):
    """With its output layer pushed towards one token, the model answers every prompt with it:
    EM and containment 1 for a target made of that token, 0 while it favours another token."""
    target = "Rome"
    (token,) = encode_pair(tokenizer, "The capital of France is", target)[1]
    other = encode_pair(tokenizer, "The capital of France is", "Paris")[1][0]
    request = make_request(prompt="The capital of France is", subject="France", target_new=target, rephrase_prompts=("France's capital is",), portability=())
    config = EvalConfig(fluency=False)

    def favouring(token_id: int) -> dict:
        bias = torch.zeros(len(tokenizer))
        bias[token_id] = 100.0
        handle = tiny_model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
        try:
            return measure_case(tiny_model, tokenizer, request, config)
        finally:
            handle.remove()

    before, after_raw = case_scores(favouring(other)), favouring(token)
    after = case_scores(after_raw)
    assert after_raw["generation"]["reliability"][0]["text"].startswith(" Rome Rome")
    assert after["gen_reliability_em"] == after["gen_reliability_contains"] == 1.0
    assert after["gen_generalization_em"] == after["reliability"] == 1.0
    assert before["gen_reliability_em"] == before["gen_reliability_contains"] == 0.0
    assert after["gen_portability_em"] is None  # no portability prompts: nothing to score


# --------------------------------------------------------------------------------------------
# Run summary, protocols and the report
# --------------------------------------------------------------------------------------------


def _raw(generation: dict) -> dict:
    return {
        "reliability": [{"target": [1], "pred": [1]}],
        "generalization": [],
        "portability": [],
        "locality": [],
        "generation": generation,
    }


def test_run_summary_by_hand():
    g = lambda text, *answers: {"text": text, "answers": list(answers)}
    pre1 = _raw({"reliability": [g(" Paris", "Rome")], "generalization": [g(" Paris", "Rome")], "portability": [g(" Roma!", "Rome", "Roma")]})
    post1 = _raw({"reliability": [g(" Rome.", "Rome")], "generalization": [g(" in Rome", "Rome"), g(" Rome", "Rome")], "portability": [g(" Roma!", "Rome", "Roma")]})
    pre2 = _raw({"reliability": [g(" the Rome", "Rome")], "generalization": [], "portability": []})
    post2 = _raw({"reliability": [g(" city of Rome", "Rome")], "generalization": [], "portability": []})
    metrics = RunMetrics()
    for pre, post in ((pre1, post1), (pre2, post2)):
        metrics.update({"case_id": "x", "pre": {"raw": pre}, "post": {"raw": post}})
    out = metrics.summary()
    assert out["gen_reliability_em"] == pytest.approx((1 + 0) / 2)
    assert out["gen_reliability_contains"] == pytest.approx((1 + 1) / 2)
    assert out["pre_gen_reliability_em"] == pytest.approx((0 + 1) / 2)  # "the Rome": the article goes
    assert out["gen_generalization_em"] == pytest.approx(0.5)  # case 2 has no rephrasings
    assert out["gen_generalization_contains"] == 1.0
    assert out["gen_portability_em"] == out["pre_gen_portability_em"] == 1.0
    protocols = protocols_of(out)
    assert all(protocols[k] == "generation" for k in out if "gen_" in k)
    assert PROTOCOLS["gen_portability_contains"] == "generation"
    # records measured without generation scoring (older runs) report no gen_* keys
    old = RunMetrics()
    old.update({"case_id": "x", "pre": {"raw": {k: v for k, v in pre2.items() if k != "generation"}}, "post": {"raw": {k: v for k, v in post2.items() if k != "generation"}}})
    assert not any("gen_" in key for key in old.summary())

    table = summary_table({"metrics": out, "cases": 2, "mode": "single", "editor": "ft_m"})
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith("gen_")}
    assert list(rows) == [
        "gen_reliability_em", "gen_reliability_contains", "gen_generalization_em",
        "gen_generalization_contains", "gen_portability_em", "gen_portability_contains",
    ]
    assert rows["gen_reliability_em"][1:4] == ["generation", "0.500", "0.500"]


# --------------------------------------------------------------------------------------------
# Memory-based editors: generation goes through model.generate, so their hooks apply
# --------------------------------------------------------------------------------------------


def test_generation_scoring_sees_a_serac_edit(tiny_model, tokenizer):
    from factedit.editors.serac import SERAC, EditMemory, SERACConfig

    request = make_request(target_new="Paris", portability=(QA("The capital of Italy is", "Rome", kind="Reasoning"),))
    config = EvalConfig(fluency=False, batch_size=4)
    pre = measure_case(tiny_model, tokenizer, request, config)
    # a classifier threshold of -1 routes every position to the counterfactual model
    edit = SERAC().apply(tiny_model, tokenizer, [request], SERACConfig(classifier_layer=1, embedding_dim=16, cf_layers=2, init_threshold=-1.0))
    try:
        # an untrained counterfactual model copies the base model; perturbed, it answers otherwise
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in EditMemory.of(tiny_model).network.parameters():
                parameter.add_(torch.randn_like(parameter))
        post = measure_case(tiny_model, tokenizer, request, config)
        for group in ("reliability", "generalization", "portability"):
            for item, prompt in zip(post["generation"][group], [request.prompt] if group == "reliability" else
                                    request.rephrase_prompts if group == "generalization" else [q.prompt for q in request.portability]):
                budget = min(max(len(encode_pair(tokenizer, prompt, a)[1]) for a in item["answers"]) + GENERATION_MARGIN, config.generation_max_new_tokens)
                assert item["text"] == _generate_alone(tiny_model, tokenizer, prompt, budget)
    finally:
        edit.revert(tiny_model)
    assert post["generation"] != pre["generation"]
    assert measure_case(tiny_model, tokenizer, request, config) == pre  # reverted: the unedited answers again


HOOK_EDITORS = ("serac", "grace", "wise", "t_patcher", "calinet", "ike")


def _greedy_logits(model, tokenizer, prompt: str, max_new_tokens: int, cached: bool) -> torch.Tensor:
    """The logits of each greedy step ``[steps, vocab]``: through ``model.generate`` with the
    key-value cache, or running the whole sequence again at every step without one."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if cached:
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True,
            )
            return torch.cat(out.logits)
        steps = []
        for _ in range(max_new_tokens):
            steps.append(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1])
            ids = torch.cat([ids, steps[-1].argmax().view(1, 1)], dim=1)
        return torch.stack(steps)


@pytest.mark.usefixtures("isolated_cache")
@pytest.mark.parametrize("name", HOOK_EDITORS)
def test_hook_editors_generate_alike_batched_alone_and_uncached(tiny_model, tokenizer, name):
    """An editor that works through forward hooks must decode alike whether a prompt is generated
    in a padded batch or alone, with the key-value cache or without any cache: its hooks have to
    follow the cache under whichever name the installed transformers passes it."""
    from factedit.editors import get_editor
    from helpers.editor_settings import TEST_SETTINGS

    request = make_request(target_new="Paris")
    editor = get_editor(name)
    settings = dict(TEST_SETTINGS[name])
    if name == "serac":  # route every position to the counterfactual model, perturbed so it answers otherwise
        settings.update(init_threshold=-1.0)
    prompts = [request.prompt, "The capital of Italy is", "Danielle Darrieux speaks the language", "Paris"]
    budgets = [6, 4, 5, 3]
    before = greedy_continuations(tiny_model, tokenizer, prompts, budgets, batch_size=3)
    edit = editor().apply(tiny_model, tokenizer, [request], editor.config_class(**settings))
    try:
        if name == "serac":
            from factedit.editors.serac import EditMemory

            torch.manual_seed(0)
            with torch.no_grad():
                for parameter in EditMemory.of(tiny_model).network.parameters():
                    parameter.add_(torch.randn_like(parameter))
        batched = greedy_continuations(tiny_model, tokenizer, prompts, budgets, batch_size=3)
        alone = [_generate_alone(tiny_model, tokenizer, p, n) for p, n in zip(prompts, budgets)]
        for prompt, budget in zip(prompts, budgets):
            cached = _greedy_logits(tiny_model, tokenizer, prompt, budget, cached=True)
            uncached = _greedy_logits(tiny_model, tokenizer, prompt, budget, cached=False)
            assert torch.allclose(cached, uncached, atol=1e-4), (prompt, (cached - uncached).abs().max())
    finally:
        edit.revert(tiny_model)
    assert batched == alone
    if name == "serac":
        assert batched != before  # the check is not vacuous: the hooks did change the text
    assert greedy_continuations(tiny_model, tokenizer, prompts, budgets, batch_size=3) == before
