"""WISE: TIES merging, shard masks, per-position routing, orthogonal writing and shards across sequential edits, caching."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import Edit, EditError, get_editor
from factedit.editors.core.lm import cache_kwargs, cache_of, collate_pairs, encode_pair, logits_at
from factedit.editors.wise import MEMORY_ATTRIBUTE, SideMemory, WISEEdit, activations, shard_mask, ties_merge
from factedit.editors.wise.editor import low_rank, protected_basis

pytestmark = pytest.mark.usefixtures("isolated_cache")

SETTINGS = dict(layer=1, alpha=1.0, beta=2.0, gamma=0.0, lr=100.0, steps=100, norm_constraint=None)


def _config(**overrides):
    return get_editor("wise").config_class(**{**SETTINGS, **overrides})


def _probe(model, tokenizer):
    pairs = [encode_pair(tokenizer, p, t) for p, t in [("The mother tongue of Danielle Darrieux is", "Paris"), ("The capital of Italy is", "Rome"), ("Angola is located in", "Africa")]]
    with torch.no_grad():
        return logits_at(model, collate_pairs(pairs, tokenizer.pad_token_id))


def _three_edits(model, tokenizer, request_factory, config):
    """Three different facts edited one after another: the probe logits before, the edits, the probe logits after each."""
    base = _probe(model, tokenizer)
    editor = get_editor("wise")()
    requests = [
        request_factory("a", target_new="Paris"),
        request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome"),
        request_factory("c", prompt="Angola is located in", subject="Angola", target_new="Europe"),
    ]
    edits, probes = [], []
    for request in requests:
        edits.append(editor.apply(model, tokenizer, [request], config))
        probes.append(_probe(model, tokenizer))
    return base, edits, probes


def _revert_in_turn(model, tokenizer, base, edits, probes):
    for i in reversed(range(len(edits))):
        edits[i].revert(model)
        assert torch.equal(_probe(model, tokenizer), probes[i - 1] if i else base)
    assert MEMORY_ATTRIBUTE not in model.__dict__


def test_ties_merge_matches_hand_computed_values():
    a = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    b = torch.tensor([[2.0, 1.0, -1.0, -4.0]])
    # Signs of the sums: +, -, -, -; the mean of the agreeing non-zero entries.
    assert torch.equal(ties_merge([a, b], density=1.0), torch.tensor([[1.5, -2.0, -1.0, -4.0]]))
    # Trimmed to the two largest magnitudes each: [0, -2, 0, 3] and [2, 0, 0, -4]; entry 2 has no sign.
    assert torch.equal(ties_merge([a, b], density=0.5), torch.tensor([[2.0, -2.0, 0.0, -4.0]]))
    assert torch.equal(ties_merge([a], density=0.5), a)


def test_shard_masks_are_fixed_by_seed_and_shard():
    m0 = shard_mask((40, 50), 0.2, seed=0, shard=0)
    assert torch.equal(m0, shard_mask((40, 50), 0.2, seed=0, shard=0))
    assert not torch.equal(m0, shard_mask((40, 50), 0.2, seed=0, shard=1))
    assert not torch.equal(m0, shard_mask((40, 50), 0.2, seed=1, shard=0))
    assert 0.15 < m0.float().mean() < 0.25


def test_positions_below_the_threshold_keep_the_main_memory_exactly(tiny_model, tokenizer, request_factory):
    edit = get_editor("wise")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config())
    memory = SideMemory.of(tiny_model, edit.module)
    state = memory.state
    ids = tokenizer(["Water boils at one hundred degrees.", "The mother tongue of Danielle Darrieux is"], return_tensors="pt", padding=True)
    module = tiny_model.get_submodule(edit.module)
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.setdefault("out", []).append((a[0].detach(), o.detach())))
    with torch.no_grad():
        tiny_model(**ids)  # the side memory's hook runs first (it was registered first)
        memory.enabled = False
        tiny_model(**ids)
        memory.enabled = True
    handle.remove()
    (x, routed), (_, plain) = seen["out"]
    fire = state.fires(x)
    assert fire.any(), "test premise: the edit prompt fires somewhere"
    assert torch.equal(routed[~fire], plain[~fire])
    assert torch.allclose(routed[fire], plain[fire] + (x @ state.delta.T)[fire], atol=1e-6)
    # The edit's threshold is act_ratio times the smallest activation of its answer positions,
    # and its activation read off the factors is its change's: || a D_e^T ||.
    assert float(state.thresholds[0]) == pytest.approx(0.88 * float(activations(edit.answer_inputs, state.delta).min()), rel=1e-4)
    assert torch.allclose(state.edit_activations(x)[..., 0], activations(x, state.delta), rtol=1e-4, atol=1e-4)


def test_shards_route_by_the_merged_memory_and_one_threshold(tiny_model, tokenizer, request_factory):
    edit = get_editor("wise")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config(writing="shards"))
    state = SideMemory.of(tiny_model, edit.module).state
    assert state.right is None
    assert state.eps == pytest.approx(0.88 * float(activations(edit.answer_inputs, state.delta).min()), rel=1e-6)
    x = torch.randn(7, state.delta.shape[1])
    assert torch.equal(state.fires(x), activations(x, state.delta) > state.eps)


def test_sequential_edits_fill_shards_merge_and_revert_exactly(tiny_model, tokenizer, request_factory):
    config = _config(writing="shards", shard_size=1)
    base, edits, probes = _three_edits(tiny_model, tokenizer, request_factory, config)
    assert [e.shard for e in edits] == [0, 1, 2]
    memory = SideMemory.of(tiny_model, edits[0].module)
    assert memory.state.shards == 3
    # The side memory is the TIES merge of the three shards.
    merged = ties_merge([memory.shard_delta(s) for s in range(3)], config.density)
    assert torch.equal(memory.state.delta.cpu(), merged)
    _revert_in_turn(tiny_model, tokenizer, base, edits, probes)
    assert not tiny_model.get_submodule(edits[0].module)._forward_hooks


def test_a_shard_takes_shard_size_requests(tiny_model, tokenizer, request_factory):
    editor, config = get_editor("wise")(), _config(writing="shards", shard_size=2)
    shards = [editor.apply(tiny_model, tokenizer, [request_factory(str(i), target_new="Paris")], config).shard for i in range(3)]
    assert shards == [0, 0, 1]


def test_fact_prompts_join_the_irrelevant_inputs_on_request(tiny_model, tokenizer, request_factory):
    from factedit.editors.core.patch import GENERIC_TEXTS, fact_prompts

    editor, request = get_editor("wise")(), request_factory(target_new="Paris")
    counts = {}
    for facts in (False, True):
        edit = editor.apply(tiny_model, tokenizer, [request], _config(steps=1, fact_inputs=facts, stand_ins=0))
        counts[facts] = edit.info["irrelevant_positions"]
        edit.revert(tiny_model)
    positions = lambda texts: sum(len(tokenizer(t)["input_ids"]) for t in dict.fromkeys(texts))
    assert counts[False] == positions(GENERIC_TEXTS)
    # Texts the request is scored on (its neighbourhood prompt and locality probe are fact prompts too) stay out.
    scored = (*request.neighborhood_prompts, *(qa.prompt for qa in request.locality))
    kept = [p for p in fact_prompts() if not any(p.startswith(q) for q in scored)]
    assert len(kept) < len(fact_prompts()), "test premise"
    assert counts[True] == positions(list(GENERIC_TEXTS) + kept)


def test_cached_generation_routes_like_one_pass(tiny_model, tokenizer, request_factory):
    get_editor("wise")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config())
    ids = tokenizer("The mother tongue of Danielle Darrieux is Paris and", return_tensors="pt").input_ids
    with torch.no_grad():
        full = tiny_model(ids).logits
        out = tiny_model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        past = cache_of(out)
        for t in range(5, ids.shape[1]):
            out = tiny_model(ids[:, t : t + 1], **cache_kwargs(tiny_model, past), use_cache=True)
            past = cache_of(out)
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_a_loaded_edit_with_the_wrong_number_of_values_is_refused(tiny_model, tokenizer, request_factory, tmp_path):
    edit = get_editor("wise")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config(writing="shards"))
    edit.revert(tiny_model)
    broken = WISEEdit(
        edit.editor, edit.module, edit.values[:-1], edit.answer_inputs, edit.shape, edit.shard, edit.seed, edit.mask_ratio, edit.density, edit.act_ratio
    )
    with pytest.raises(EditError, match="values but the mask"):
        broken.apply(tiny_model)
    edit.save(tmp_path / "e")
    assert isinstance(Edit.load(tmp_path / "e"), WISEEdit)


def test_config_is_validated():
    with pytest.raises(ValueError, match="alpha"):
        _config(alpha=3.0, beta=2.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        _config(mask_ratio=0.0)
    with pytest.raises(ValueError, match="writing"):
        _config(writing="merged")
    with pytest.raises(ValueError, match="norm_constraint"):
        _config(norm_constraint=1.0)
    assert _config(writing="shards", norm_constraint=1.0).norm_constraint == 1.0


def test_protected_basis_spans_earlier_inputs_and_the_main_irrelevant_directions():
    generator = torch.Generator().manual_seed(0)
    earlier = torch.randn(3, 20, generator=generator)
    direction = torch.randn(20, generator=generator)
    irrelevant = torch.randn(50, 1, generator=generator) * 10 * direction + 0.01 * torch.randn(50, 20, generator=generator)
    basis = protected_basis(earlier, irrelevant, energy=0.9)
    assert basis.shape == (20, 4)  # three earlier inputs and the one dominant irrelevant direction
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    inside = lambda v: torch.linalg.norm(v - basis @ (basis.T @ v)) / torch.linalg.norm(v)
    assert all(inside(row) < 1e-4 for row in earlier)
    assert inside(direction) < 1e-3
    assert protected_basis(None, irrelevant, energy=0.0) is None


def test_low_rank_storage_keeps_a_change_orthogonal_to_protected_inputs():
    generator = torch.Generator().manual_seed(1)
    protected = torch.linalg.qr(torch.randn(30, 5, generator=generator)).Q
    change = torch.randn(12, 4, generator=generator) @ torch.randn(4, 30, generator=generator)
    change = change - (change @ protected) @ protected.T
    left, right = low_rank(change, energy=0.9999)
    assert left.shape[1] <= 4
    assert torch.allclose(left @ right, change, atol=1e-4)
    assert (left @ right @ protected).abs().max() < 1e-4


def test_orthogonal_writing_leaves_earlier_edits_outputs_and_reverts_exactly(tiny_model, tokenizer, request_factory, tmp_path):
    base, edits, probes = _three_edits(tiny_model, tokenizer, request_factory, _config())
    memory = SideMemory.of(tiny_model, edits[0].module)
    assert [e.writing for e in edits] == ["orthogonal"] * 3 and memory.state.shards == 1
    delta = memory.state.delta.cpu()
    for i, edit in enumerate(edits):
        assert edit.values.numel() == 0 and edit.info["rank"] == edit.factors[0].shape[1]
        # Later changes are orthogonal to this edit's answer inputs: its side-memory output is its own.
        own = torch.zeros_like(delta)
        for e in edits[: i + 1]:
            e.add_to(own)
        assert torch.allclose(edit.answer_inputs @ delta.T, edit.answer_inputs @ own.T, atol=1e-3 * float((edit.answer_inputs @ own.T).abs().max()))
    # Each position gets the changes of the edits that fire there, and only those.
    state = memory.state
    x = torch.cat([e.answer_inputs for e in edits] + [torch.randn(5, delta.shape[1])]).to(state.right.device)
    gate = state.edit_activations(x) > state.thresholds
    assert gate[: len(edits[0].answer_inputs), 0].all(), "test premise: an edit fires at its own answer inputs"
    changes = []
    for e in edits:
        change = torch.zeros_like(delta)
        e.add_to(change)
        changes.append(change.to(x.device))
    expected = sum(gate[:, i : i + 1] * (x @ changes[i].T) for i in range(len(edits)))
    extra, fire = state.gated(x)
    assert torch.allclose(extra, expected, atol=1e-4) and torch.equal(fire, gate.any(-1))
    # Mixing writing modes in one side memory is refused.
    with pytest.raises(EditError, match="writing"):
        get_editor("wise")().apply(tiny_model, tokenizer, [request_factory("d", target_new="Rome")], _config(writing="shards"))
    edits[1].save(tmp_path / "b")
    loaded = Edit.load(tmp_path / "b")
    assert isinstance(loaded, WISEEdit) and loaded.writing == "orthogonal"
    assert all(torch.equal(x, y) for x, y in zip(loaded.factors, edits[1].factors))
    _revert_in_turn(tiny_model, tokenizer, base, edits, probes)


def test_stand_ins_and_retained_probes_join_the_irrelevant_inputs(request_factory):
    from factedit.editors.core.facts import KnownFacts
    from factedit.editors.requests import QA

    editor = get_editor("wise")()
    request = request_factory(target_new="Paris")
    other = request_factory("o", prompt="The mother tongue of Jean Gabin is", subject="Jean Gabin", locality=(QA("Who wrote Hamlet?", "Shakespeare"),))
    editor._retain_file = ("facts.json", KnownFacts.of([other]))
    texts = editor._irrelevant_texts([request], _config(stand_ins=2, retain_path="facts.json", retain_texts=4), 0)
    assert "The mother tongue of Jean Gabin is" in texts
    assert any(t.startswith("Who wrote Hamlet?") for t in texts)
    scored = {request.prompt, *request.rephrase_prompts, *request.neighborhood_prompts, *(qa.prompt for qa in request.locality)}
    assert not scored & set(texts)
    with pytest.raises(EditError, match="retain_path"):
        get_editor("wise")()._irrelevant_texts([request], _config(retain_path="facts.json"), 0)
