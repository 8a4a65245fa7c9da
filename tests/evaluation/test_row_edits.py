"""Cases measured together: each batch row with its own case's edit (RowEdits), the probes of
several cases sharing batches (measure_cases), and the runner's chunks against one case at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factedit.editors import get_editor
from factedit.editors.base import Edit, ParamDelta
from factedit.editors.core.targets import get_targets
from factedit.evaluation.generation import generate_texts
from factedit.evaluation.row_edits import RowEdits, can_share_rows
from factedit.evaluation.runner import EditRun
from factedit.evaluation.run_dir import read_jsonl
from factedit.evaluation.scoring import EvalConfig, measure_case, measure_cases

class _Memory(Edit):
    """An edit kind of its own, as memory editors have: code, not a plain weight change."""

    kind = "test_row_memory"


EVAL = EvalConfig(batch_size=4, generation_length=6, generation_max_new_tokens=3, generation_prompts=2)


def _edits(model, seed: int) -> list[Edit]:
    """Two edits of one case: a dense change of one MLP output matrix (and, where it has one, its
    bias) and a rank-one change of another block's, large enough to change predictions."""
    generator = torch.Generator().manual_seed(seed)
    targets = get_targets(model)
    first_name, second_name = targets.layer("mlp_out", 0), targets.layer("mlp_out", 1)
    first, second = model.get_submodule(first_name), model.get_submodule(second_name)
    dense = {f"{first_name}.weight": ParamDelta(delta=torch.randn(first.weight.shape, generator=generator))}
    if getattr(first, "bias", None) is not None:
        dense[f"{first_name}.bias"] = ParamDelta(delta=torch.randn(first.bias.shape, generator=generator))
    rows, cols = second.weight.shape
    low_rank = {f"{second_name}.weight": ParamDelta(left=torch.randn(rows, 1, generator=generator), right=torch.randn(1, cols, generator=generator))}
    return [Edit("test", dense, [str(seed)]), Edit("test", low_rank, [str(seed)])]


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_each_row_runs_with_its_own_case_edit(tiny_model):
    """Rows of three cases (one of them unedited) in one batch give, row for row, the logits of
    the model carrying that case's edits alone, for nn.Linear and GPT-2's Conv1D alike."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 300, (5, 7))
    per_case = [_edits(tiny_model, 1), _edits(tiny_model, 2), []]
    owners = [0, 1, 2, 1, 0]
    expected = []
    for row, case in enumerate(owners):
        for edit in per_case[case]:
            edit.apply(tiny_model)
        expected.append(_logits(tiny_model, input_ids[row : row + 1])[0])
        for edit in reversed(per_case[case]):
            edit.revert(tiny_model)
    unedited = _logits(tiny_model, input_ids)
    with RowEdits(tiny_model, per_case) as rows:
        rows.select(owners)
        together = _logits(tiny_model, input_ids)
    for row, case in enumerate(owners):
        torch.testing.assert_close(together[row], expected[row], rtol=1e-5, atol=1e-5)
        if case != 2:  # the edits do change what the model says
            assert not torch.allclose(together[row], unedited[row], atol=1e-3)
    torch.testing.assert_close(_logits(tiny_model, input_ids), unedited, rtol=0, atol=0)  # hooks gone on leaving


def test_one_case_alone_measures_exactly_as_the_edited_model(tiny_model, tokenizer, request_factory):
    """A case alone in its batch through RowEdits: the same bits as the model edited in place
    (the edited weights are written exactly as Edit.apply writes them)."""
    request = request_factory()
    edits = _edits(tiny_model, 3)
    for edit in edits:
        edit.apply(tiny_model)
    in_place = measure_case(tiny_model, tokenizer, request, EVAL)
    for edit in reversed(edits):
        edit.revert(tiny_model)
    with RowEdits(tiny_model, [edits]) as rows:
        (together,) = measure_cases(tiny_model, tokenizer, [request], EVAL, select=rows.select)
    assert together == in_place
    assert measure_case(tiny_model, tokenizer, request, EVAL) != in_place  # the edit changed the measurements


def test_cases_measured_together_equal_each_alone(tiny_model, tokenizer, request_factory):
    """Several cases' probes, samples and answers share batches: the predictions, texts and
    answers are each case's own, the NLLs equal up to float rounding."""
    requests = [
        request_factory("0"),
        request_factory("1", prompt="The capital of France is", subject="France", target_new="Rome", generation_prompts=("France is", "Paris is")),
        request_factory("2", prompt="Angola is located in", subject="Angola", target_new="Europe"),
    ]
    per_case = [_edits(tiny_model, 4), [], _edits(tiny_model, 5)]
    alone = []
    for request, edits in zip(requests, per_case):
        for edit in edits:
            edit.apply(tiny_model)
        alone.append(measure_case(tiny_model, tokenizer, request, EVAL))
        for edit in reversed(edits):
            edit.revert(tiny_model)
    with RowEdits(tiny_model, per_case) as rows:
        together = measure_cases(tiny_model, tokenizer, requests, EVAL, select=rows.select)
    assert len(together) == 3 and len(together[1]["fluency"]["texts"]) == 2
    for one, joint in zip(alone, together):
        assert joint.keys() == one.keys()
        for key in one:
            if isinstance(one[key], dict) and "nll_new" in one[key]:
                for part in ("nll_new", "nll_true"):
                    assert joint[key][part] == pytest.approx(one[key][part], rel=1e-4, abs=1e-5)
            else:
                assert joint[key] == one[key], key


def test_a_case_samples_alike_whatever_shares_its_batch(tokenizer):
    """Fluency samples draw from each case's own seeded generator: a case's text does not depend
    on the other cases in its batch, and equals transformers' own sampling of it alone."""
    from helpers import build_llama

    model = build_llama(len(tokenizer))
    config = dataclasses.replace(EVAL, generation_length=8, top_k=5)
    alone = generate_texts(model, tokenizer, ["The capital of France is"], config)
    together = generate_texts(model, tokenizer, ["Angola is located in the south of", "The capital of France is"], config, owners=[0, 1])
    assert together[1] == alone[0] and together[0] != together[1]
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    torch.manual_seed(config.seed)
    out = model.generate(**inputs, do_sample=True, top_k=5, top_p=1.0, temperature=1.0, max_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.batch_decode(out, skip_special_tokens=True) == alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_draw_equals_torch_multinomial(dtype):
    """The sampler's cheaper draw takes the generator's numbers exactly as torch.multinomial does:
    the same tokens, step after step, for top-k rows (ties included), several rows and dense rows."""
    from factedit.evaluation.generation import _multinomial_one

    for trial in range(40):
        scores = torch.randn(1 + trial % 3, 5000, dtype=dtype) * 3
        if trial % 4 == 0:
            scores[:, :7] = 9.0  # tied top scores
        if trial % 5 != 4:  # top-k; every fifth trial dense
            scores = scores.masked_fill(scores < torch.topk(scores, 5)[0][..., -1, None], -float("inf"))
        probs = torch.softmax(scores, dim=-1)
        ours, theirs = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        for _ in range(3):
            assert torch.equal(_multinomial_one(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])


def test_only_weight_changes_of_linear_layers_share_rows(tiny_model):
    embedding = next(n for n, _ in tiny_model.named_parameters() if "wte" in n or "embed_tokens" in n)
    shape = dict(tiny_model.named_parameters())[embedding].shape
    assert can_share_rows(tiny_model, _edits(tiny_model, 6))
    assert not can_share_rows(tiny_model, [Edit("test", {embedding: ParamDelta(delta=torch.zeros(shape))})])
    assert not can_share_rows(tiny_model, [])
    assert not can_share_rows(tiny_model, [_Memory("test", _edits(tiny_model, 7)[0].deltas)])
    with pytest.raises(ValueError, match="plain weight changes"):
        RowEdits(tiny_model, [[Edit("test", {embedding: ParamDelta(delta=torch.zeros(shape))})]])


def _ike_edits(model, tokenizer, requests):
    from factedit.editors.ike import IKEConfig

    editor, edits = get_editor("ike")(), []
    for request in requests:
        edit = editor.apply(model, tokenizer, [request], IKEConfig(k=0, builtin_pool=False))  # GPT-2's 128 positions
        edit.revert(model)
        edits.append(edit)
    return edits


def test_each_row_runs_with_its_own_ike_context(tiny_model, tokenizer, request_factory):
    """IKE's contexts per row (RowContexts): rows of three cases, one with no edit, of contexts of
    different lengths, give the teacher-forced logits and the samples of the model carrying only
    their case's context (ContextPrefix), within float rounding."""
    from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at
    from factedit.editors.ike.editor import RowContexts

    requests = [request_factory("a", target_new="Paris"), request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="the city of Rome")]
    edits = _ike_edits(tiny_model, tokenizer, requests)
    assert len(edits[0].demo_ids) + len(edits[0].fact_ids) != len(edits[1].demo_ids) + len(edits[1].fact_ids)
    per_case = [[edits[0]], [edits[1]], []]
    pairs = [("The capital of Italy is", "Rome"), ("Danielle Darrieux speaks", "English and French")]
    owners = [0, 1, 2, 1, 0, 2]
    config = dataclasses.replace(EVAL, generation_length=8)
    expected, texts = [], []
    for row, case in enumerate(owners):
        for edit in per_case[case]:
            edit.apply(tiny_model)
        with torch.no_grad():
            expected.append(logits_at(tiny_model, collate_pairs([encode_pair(tokenizer, *pairs[row % 2])], tokenizer.pad_token_id)))
        texts += generate_texts(tiny_model, tokenizer, [pairs[row % 2][0]], config)
        for edit in per_case[case]:
            edit.revert(tiny_model)
    batch = collate_pairs([encode_pair(tokenizer, *pairs[row % 2]) for row in range(len(owners))], tokenizer.pad_token_id)
    assert can_share_rows(tiny_model, edits[:1])
    with RowContexts(tiny_model, per_case) as rows, torch.no_grad():
        rows.select(owners)
        together = logits_at(tiny_model, batch)
    # sampling: each row its own case (its own seeded generator), cases of one edit sharing its context
    with RowContexts(tiny_model, [per_case[case] for case in owners]) as rows:
        assert len(rows.contexts) == 3
        sampled = generate_texts(tiny_model, tokenizer, [pairs[row % 2][0] for row in range(len(owners))], config, list(range(len(owners))), rows.select)
    torch.testing.assert_close(together, torch.cat(expected), rtol=1e-4, atol=1e-5)
    assert sampled == texts
    assert not torch.allclose(expected[0], expected[5][: len(expected[0])]), "test premise: the context changes the logits"


@pytest.mark.parametrize("editor_name", ["ft_m", "grace", "ike"])
def test_chunked_runs_equal_one_case_at_a_time(editor_name, tokenizer, request_factory, tmp_path, monkeypatch):
    """A run measuring its cases in chunks gives each case the numbers it gets measured alone:
    FT-M's weight changes through RowEdits (made together), IKE's contexts through RowContexts,
    GRACE's codebook on the edited model, case by case."""
    from helpers import build_llama

    requests = [request_factory(str(i), target_new=t) for i, t in enumerate(["English", "German", "Italian"])]
    editor_class = get_editor(editor_name)
    settings = {"ft_m": {"layers": [1], "steps": 3}, "grace": {"layer": 1, "steps": 3}, "ike": {"k": 0, "builtin_pool": False}}[editor_name]
    from factedit.evaluation import runner

    shared = []  # the per-row classes the runner measured edited cases with
    real = runner.share_rows
    monkeypatch.setattr(runner, "share_rows", lambda model, per_case: shared.append(type(found := real(model, per_case)).__name__) or found)
    lines = {}
    for case_batch in (1, 16):
        out = tmp_path / str(case_batch)
        config = dataclasses.replace(EVAL, case_batch=case_batch)
        EditRun(build_llama(len(tokenizer)), tokenizer, editor_class(), editor_class.config_class(**settings), requests, out, eval_config=config, progress=False).run()
        lines[case_batch] = read_jsonl(out / "cases.jsonl")
    assert shared == {"ft_m": ["RowEdits"] * 4, "grace": [], "ike": ["RowContexts"] * 4}[editor_name]
    for one, joint in zip(lines[1], lines[16]):
        assert one["case_id"] == joint["case_id"]
        for stage in ("pre", "post"):
            for key, value in one[stage]["scores"].items():
                assert joint[stage]["scores"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (stage, key)
            assert joint[stage]["raw"]["fluency"] == one[stage]["raw"]["fluency"]
            assert joint[stage]["raw"]["reliability"] == one[stage]["raw"]["reliability"]
    # each edit did its work: the new target is likelier on its own prompt (a context on a tiny
    # random model need not make it so: IKE's rows are checked against the edited model above)
    for line in lines[16] if editor_name != "ike" else []:
        assert line["post"]["raw"]["es"]["nll_new"][0] < line["pre"]["raw"]["es"]["nll_new"][0] - 1e-3
