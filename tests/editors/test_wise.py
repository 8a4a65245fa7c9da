"""WISE: TIES merging, shard masks, per-position routing, shards across sequential edits, caching."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import Edit, EditError, get_editor
from factedit.editors.core.lm import cache_kwargs, cache_of, collate_pairs, encode_pair, logits_at
from factedit.editors.wise import MEMORY_ATTRIBUTE, SideMemory, WISEEdit, activations, shard_mask, ties_merge

pytestmark = pytest.mark.usefixtures("isolated_cache")

SETTINGS = dict(layer=1, alpha=1.0, beta=2.0, gamma=0.0, lr=100.0, steps=100, norm_constraint=None)


def _config(**overrides):
    return get_editor("wise").config_class(**{**SETTINGS, **overrides})


def _probe(model, tokenizer):
    pairs = [encode_pair(tokenizer, p, t) for p, t in [("The mother tongue of Danielle Darrieux is", "Paris"), ("The capital of Italy is", "Rome"), ("Angola is located in", "Africa")]]
    with torch.no_grad():
        return logits_at(model, collate_pairs(pairs, tokenizer.pad_token_id))


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
    fire = activations(x, state.delta) > state.eps
    assert fire.any(), "test premise: the edit prompt fires somewhere"
    assert torch.equal(routed[~fire], plain[~fire])
    assert torch.allclose(routed[fire], plain[fire] + (x @ state.delta.T)[fire], atol=1e-6)
    # The threshold is act_ratio times the smallest activation of the stored edit's answer positions.
    assert state.eps == pytest.approx(0.88 * float(activations(edit.answer_inputs, state.delta).min()), rel=1e-6)


def test_sequential_edits_fill_shards_merge_and_revert_exactly(tiny_model, tokenizer, request_factory):
    base = _probe(tiny_model, tokenizer)
    editor, config = get_editor("wise")(), _config(shard_size=1)
    requests = [
        request_factory("a", target_new="Paris"),
        request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome"),
        request_factory("c", prompt="Angola is located in", subject="Angola", target_new="Europe"),
    ]
    edits, probes = [], []
    for request in requests:
        edits.append(editor.apply(tiny_model, tokenizer, [request], config))
        probes.append(_probe(tiny_model, tokenizer))
    assert [e.shard for e in edits] == [0, 1, 2]
    memory = SideMemory.of(tiny_model, edits[0].module)
    assert memory.state.shards == 3
    # The side memory is the TIES merge of the three shards.
    merged = ties_merge([memory.shard_delta(s) for s in range(3)], config.density)
    assert torch.equal(memory.state.delta.cpu(), merged)
    for i in (2, 1, 0):
        edits[i].revert(tiny_model)
        assert torch.equal(_probe(tiny_model, tokenizer), probes[i - 1] if i else base)
    assert MEMORY_ATTRIBUTE not in tiny_model.__dict__
    assert not tiny_model.get_submodule(edits[0].module)._forward_hooks


def test_a_shard_takes_shard_size_requests(tiny_model, tokenizer, request_factory):
    editor, config = get_editor("wise")(), _config(shard_size=2)
    shards = [editor.apply(tiny_model, tokenizer, [request_factory(str(i), target_new="Paris")], config).shard for i in range(3)]
    assert shards == [0, 0, 1]


def test_fact_prompts_join_the_irrelevant_inputs_on_request(tiny_model, tokenizer, request_factory):
    from factedit.editors.core.patch import GENERIC_TEXTS, fact_prompts

    editor, request = get_editor("wise")(), request_factory(target_new="Paris")
    counts = {}
    for facts in (False, True):
        edit = editor.apply(tiny_model, tokenizer, [request], _config(steps=1, fact_inputs=facts))
        counts[facts] = edit.info["irrelevant_positions"]
        edit.revert(tiny_model)
    positions = lambda texts: sum(len(tokenizer(t)["input_ids"]) for t in dict.fromkeys(texts))
    assert counts[False] == positions(GENERIC_TEXTS)
    assert counts[True] == positions(list(GENERIC_TEXTS) + fact_prompts())


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
    edit = get_editor("wise")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config())
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
