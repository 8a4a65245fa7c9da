"""ROME, MEMIT, PMET, AlphaEdit: the pieces and the maths, on tiny random models."""

from __future__ import annotations


import pytest
import torch

from factedit.editors import get_editor
from factedit.editors.core.hooks import edit_output, trace
from factedit.editors.memit import AlphaEdit, AlphaEditConfig, MEMIT, MEMITConfig, PMET
from factedit.editors.core.lm import collate_pairs, length_batches, logits_at, target_nll
from factedit.editors.core.prefix import BelowRecorded, FrozenPrefix, TopMLPReadout, frozen_below
from factedit.editors.rome import ROMEConfig
from factedit.editors.rome.context import sample_prefixes, subject_last_index
from factedit.editors.rome.keys import subject_reads
from factedit.editors.rome.values import optimise_values
from factedit.editors.core.targets import get_module, get_targets, weight_as_out_in

pytestmark = pytest.mark.usefixtures("isolated_cache")

TINY = dict(v_steps=30, v_weight_decay=0.0, clamp_norm_factor=1e4, context_count=2, stats_samples=8, stats_max_length=16)


def _subject_last(request_factory, case_id="0", **kw):
    return request_factory(case_id, prompt="The mother tongue is Danielle Darrieux", target_new="Paris", **kw)


# -- frozen prefix ------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_frozen_prefix_matches_full_forward(tiny_model, layer):
    targets = get_targets(tiny_model)
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [20, 21]]
    splits = [3, 0, 2, 1]  # a row without prefix is left-padded entirely
    module = targets.layer("mlp_out", layer)
    torch.manual_seed(0)
    delta = torch.randn(len(sequences), tiny_model.config.hidden_size)
    frozen = FrozenPrefix(tiny_model, targets, sequences, splits, layer, pad_id=0)

    def add_at_split(out):
        return torch.cat([out[:, :1] + delta[rows][:, None], out[:, 1:]], dim=1)

    rows = torch.arange(len(sequences))
    with torch.no_grad(), edit_output(tiny_model, module, add_at_split):
        edited = frozen.hidden()
    with torch.no_grad():
        plain = frozen.hidden()
    for i, (seq, split) in enumerate(zip(sequences, splits)):

        def add_here(out, i=i, split=split):
            out = out.clone()
            out[0, split] += delta[i]
            return out

        with torch.no_grad():
            full = tiny_model.base_model(input_ids=torch.tensor([seq])).last_hidden_state[0, split:]
            with edit_output(tiny_model, module, add_here):
                full_edited = tiny_model.base_model(input_ids=torch.tensor([seq])).last_hidden_state[0, split:]
        n = len(seq) - split
        torch.testing.assert_close(plain[i, :n], full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(edited[i, :n], full_edited, atol=1e-5, rtol=1e-4)

    # Dropping rows keeps the others' results.
    rows = torch.tensor([0, 2])
    frozen.select(rows)
    with torch.no_grad(), edit_output(tiny_model, module, add_at_split):
        kept = frozen.hidden()
    torch.testing.assert_close(kept, edited[rows], atol=1e-5, rtol=1e-4)


def test_frozen_prefix_runs_no_block_below_the_edited_one(tiny_model):
    targets = get_targets(tiny_model)
    frozen = FrozenPrefix(tiny_model, targets, [[5, 6, 7, 8]], [2], layer=2, pad_id=0)
    below = [targets.layer("mlp_out", 0), targets.layer("mlp_out", 1)]
    with trace(tiny_model, below + [targets.layer("mlp_out", 2)]) as traced:
        frozen.hidden()
    assert [traced[n].calls for n in below] == [0, 0]
    assert traced[targets.layer("mlp_out", 2)].calls == 1


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_frozen_below_gives_the_full_loss_and_gradient_running_only_the_upper_blocks(tiny_model, layer):
    """Training something at block ``layer`` inside frozen_below: same loss, same gradient."""
    targets = get_targets(tiny_model)
    batch = collate_pairs([([5, 6, 7], [8, 9]), ([11, 12], [13]), ([14, 15, 16, 17], [18, 19, 20])], pad_id=0)
    module = targets.layer("mlp_out", layer)
    torch.manual_seed(0)
    delta = torch.randn(tiny_model.config.hidden_size, requires_grad=True)

    def run():
        with edit_output(tiny_model, module, lambda out: out + delta):
            loss = target_nll(tiny_model, batch).sum()
        (grad,) = torch.autograd.grad(loss, [delta])
        return loss.detach(), grad

    full_loss, full_grad = run()
    names = [targets.layer("mlp_out", i) for i in range(3)]
    with trace(tiny_model, names) as traced:  # hooks on the real modules, also while they are stood in for
        with frozen_below(tiny_model, targets, layer, batch.input_ids, batch.attention_mask):
            loss, grad = run()
            loss_again, _ = run()
    # One recording pass through every block, then the two runs through the upper blocks only.
    assert [traced[n].calls for n in names] == ([1] * layer + [3] * (3 - layer) if layer else [2, 2, 2])
    torch.testing.assert_close(loss, full_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(loss, loss_again)
    # Afterwards the model is whole again: every block runs.
    with trace(tiny_model, names) as traced:
        assert torch.equal(run()[0], full_loss)
    assert [traced[n].calls for n in names] == [1, 1, 1]


def test_frozen_below_refuses_a_batch_of_another_shape(tiny_model):
    targets = get_targets(tiny_model)
    batch = collate_pairs([([5, 6, 7], [8, 9])], pad_id=0)
    other = collate_pairs([([5, 6], [8]), ([7, 9], [10])], pad_id=0)
    with frozen_below(tiny_model, targets, 2, batch.input_ids, batch.attention_mask):
        with pytest.raises(RuntimeError, match="shape"):
            target_nll(tiny_model, other)


def test_below_recorded_replays_each_batch_as_a_full_pass(tiny_model):
    """Several batches recorded once; each replayed batch gives the full pass's loss and gradient."""
    targets = get_targets(tiny_model)
    batches = [collate_pairs([([5, 6, 7], [8, 9]), ([11, 12], [13])], pad_id=0), collate_pairs([([14, 15, 16, 17, 3], [18])], pad_id=0)]
    module = targets.layer("mlp_out", 1)
    torch.manual_seed(0)
    delta = torch.randn(tiny_model.config.hidden_size, requires_grad=True)

    def run(batch):
        with edit_output(tiny_model, module, lambda out: out + delta):
            loss = target_nll(tiny_model, batch).sum()
        (grad,) = torch.autograd.grad(loss, [delta])
        return loss.detach(), grad

    full = [run(b) for b in batches]
    below = BelowRecorded(tiny_model, targets, 1, [(b.input_ids, b.attention_mask) for b in batches])
    for i in (1, 0, 1):
        with below.replaying(i):
            loss, grad = run(batches[i])
            with pytest.raises(RuntimeError, match="shape"):
                target_nll(tiny_model, batches[1 - i])
        torch.testing.assert_close(loss, full[i][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, full[i][1], atol=1e-6, rtol=1e-5)
    assert torch.equal(run(batches[0])[0], full[0][0])  # whole again afterwards


def test_top_mlp_readout_gives_the_full_logits_with_neurons_added(tiny_model):
    targets = get_targets(tiny_model)
    batches = [collate_pairs([([5, 6, 7], [8, 9]), ([11, 12], [13])], pad_id=0), collate_pairs([([14, 15, 16, 17, 3], [18])], pad_id=0)]
    readout = TopMLPReadout(tiny_model, targets, batches)
    assert readout.exact
    torch.manual_seed(0)
    weight = torch.randn(tiny_model.config.hidden_size, tiny_model.config.hidden_size)
    extra = lambda x: torch.relu(x @ weight)
    top = targets.layer("mlp", tiny_model.config.num_hidden_layers - 1)
    handle = get_module(tiny_model, top).register_forward_hook(lambda m, args, out: out + extra(args[0]))
    try:
        with torch.no_grad():
            full = [logits_at(tiny_model, b) for b in batches]
    finally:
        handle.remove()
    for i, b in enumerate(batches):
        torch.testing.assert_close(readout.logits(i, extra), full[i], atol=1e-5, rtol=1e-5)
        assert readout.logits(i, extra).shape[0] == len(b.rows)


def test_length_batches_sort_and_respect_the_token_budget():
    encoded = [([1] * n, [2] * (n % 3 + 1)) for n in (7, 2, 9, 4, 4, 12, 1)]
    batches = length_batches(encoded, pad_id=0, device="cpu", max_tokens=24)
    rows = [tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b.input_ids, b.attention_mask)]
    assert sorted(rows) == sorted(tuple(p + t) for p, t in encoded)  # every sequence once
    lengths = [len(r) for r in rows]
    assert lengths == sorted(lengths)
    assert all(b.input_ids.numel() <= 24 or len(b.lengths) == 1 for b in batches)
    assert len(length_batches(encoded, 0, "cpu", 10**6)) == 1


# -- context and positions ----------------------------------------------------------------------
def test_subject_last_index(tokenizer):
    text = "Some prefix. The mother tongue of Danielle Darrieux is"
    index = subject_last_index(tokenizer, text, "Danielle Darrieux")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids[: index + 1]).endswith("Darrieux")
    assert not tokenizer.decode(ids[:index]).endswith("Darrieux")
    # a later occurrence is found when searching from an offset
    twice = "Paris is in France. Paris is"
    assert subject_last_index(tokenizer, twice, "Paris", start=5) > subject_last_index(tokenizer, twice, "Paris")
    with pytest.raises(ValueError, match="does not occur"):
        subject_last_index(tokenizer, text, "Rome")


def test_prefixes_are_reproducible(tiny_model, tokenizer):
    first = sample_prefixes(tiny_model, tokenizer, 3, 5, seed=1)
    assert first == sample_prefixes(tiny_model, tokenizer, 3, 5, seed=1)
    assert first != sample_prefixes(tiny_model, tokenizer, 3, 5, seed=2)
    assert all(p.endswith(". ") and "{" not in p for p in first)


def test_subject_reads_average_over_prefixes(tiny_model, tokenizer, request_factory):
    targets = get_targets(tiny_model)
    req = request_factory()
    module = targets.layer("mlp_out", 1)
    prefixes = ["", "Hello there. "]
    reads = subject_reads(tiny_model, tokenizer, [req], prefixes, inputs_of=[module])
    expected = []
    for prefix in prefixes:
        text = prefix + req.prompt
        index = subject_last_index(tokenizer, text, req.subject, len(prefix))
        with trace(tiny_model, [module]) as traced, torch.no_grad():
            tiny_model(**tokenizer(text, return_tensors="pt"))
        expected.append(traced[module].input[0, index])
    torch.testing.assert_close(reads[("input", module)][0], torch.stack(expected).mean(0))


# -- value optimisation -------------------------------------------------------------------------
def test_values_batched_equal_values_alone(tiny_model, tokenizer, request_factory):
    targets = get_targets(tiny_model)
    config = ROMEConfig(layer=1, **{**TINY, "v_steps": 8})
    a = _subject_last(request_factory, "a")
    b = request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome")
    prefixes = ["", "Hello there. "]
    together = optimise_values(tiny_model, tokenizer, [a, b], prefixes, targets, 1, config)
    alone = [optimise_values(tiny_model, tokenizer, [r], prefixes, targets, 1, config) for r in (a, b)]
    module = targets.layer("mlp_out", 1)
    for i, single in enumerate(alone):
        torch.testing.assert_close(together.deltas[module][i], single.deltas[module][0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(together.keys[module][i], single.keys[module][0], atol=1e-5, rtol=1e-4)
    assert together.steps == [s.steps[0] for s in alone]


def test_values_come_back_in_request_order(tiny_model, tokenizer, request_factory):
    """Requests are batched by suffix length; the results still follow the requests' order."""
    targets = get_targets(tiny_model)
    module = targets.layer("mlp_out", 1)
    long_tail = request_factory("long", prompt="Danielle Darrieux speaks the language of her home country, which is", target_new="English")
    short_tail = _subject_last(request_factory, "short")
    config = ROMEConfig(layer=1, **{**TINY, "v_steps": 4, "batch_requests": 1})
    both = optimise_values(tiny_model, tokenizer, [long_tail, short_tail], [""], targets, 1, config)
    for i, request in enumerate([long_tail, short_tail]):
        alone = optimise_values(tiny_model, tokenizer, [request], [""], targets, 1, config)
        torch.testing.assert_close(both.deltas[module][i], alone.deltas[module][0])
        torch.testing.assert_close(both.keys[module][i], alone.keys[module][0])
        assert both.steps[i] == alone.steps[0]


def test_values_stop_once_the_target_is_reached(tiny_model, tokenizer, request_factory):
    targets = get_targets(tiny_model)
    module = targets.layer("mlp_out", 1)
    request = _subject_last(request_factory)
    reached = optimise_values(tiny_model, tokenizer, [request], [""], targets, 1, ROMEConfig(layer=1, **{**TINY, "v_steps": 5, "stop_loss": 100.0}))
    assert reached.steps == [0] and not reached.deltas[module].any()
    never = optimise_values(tiny_model, tokenizer, [request], [""], targets, 1, ROMEConfig(layer=1, **{**TINY, "v_steps": 5, "stop_loss": -1.0}))
    assert never.steps == [5] and never.deltas[module].any()


# -- ROME -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adjust", [True, False])
def test_rome_is_rank_one_and_writes_v_star_at_k_star(tiny_model, tokenizer, request_factory, adjust):
    rome = get_editor("rome")()
    config = ROMEConfig(layer=1, mom2_adjustment=adjust, **TINY)
    targets = get_targets(tiny_model)
    module = get_module(tiny_model, targets.layer("mlp_out", 1))
    request = _subject_last(request_factory)
    before = weight_as_out_in(module).detach().clone()
    edit = rome.apply(tiny_model, tokenizer, [request], config)
    (name, delta), = edit.deltas.items()
    assert delta.rank == 1
    out_f, in_f = before.shape
    assert edit.num_stored_values() == out_f + in_f  # factors, not the matrix
    # W' k* = W k* + delta (the residual is the optimised vector: Rebuilding ROME).
    prefixes = rome.prefixes(tiny_model, tokenizer, config)
    edit.revert(tiny_model)
    values = optimise_values(tiny_model, tokenizer, [request], prefixes, targets, 1, config)
    key = values.keys[targets.layer("mlp_out", 1)][0]
    change = (weight_as_out_in(module).detach() + _out_in(module, delta.dense())) @ key - before @ key
    torch.testing.assert_close(change, values.deltas[targets.layer("mlp_out", 1)][0], atol=1e-3, rtol=1e-3)


def _out_in(module, dense):
    from factedit.editors.core.targets import is_transposed

    return dense.T if is_transposed(module) else dense


def test_rome_rejects_batches(tiny_model, tokenizer, request_factory):
    with pytest.raises(ValueError, match="one request per call"):
        get_editor("rome")().apply(tiny_model, tokenizer, [request_factory("a"), request_factory("b")], ROMEConfig(**TINY))


def test_rome_statistics_are_computed_once_per_editor(tiny_model, tokenizer, request_factory, monkeypatch):
    from factedit.editors.core import stats

    calls = []
    real = stats.layer_statistics

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "layer_statistics", counting)
    rome = get_editor("rome")()
    config = ROMEConfig(layer=1, **{**TINY, "v_steps": 2})
    for case in ("a", "b"):
        rome.apply(tiny_model, tokenizer, [_subject_last(request_factory, case)], config).revert(tiny_model)
    assert len(calls) == 1


# -- MEMIT and friends --------------------------------------------------------------------------
def test_memit_single_layer_solves_the_least_squares_exactly(tiny_model, tokenizer):
    memit = MEMIT()
    torch.manual_seed(0)
    keys = torch.randn(3, 64, dtype=torch.float64)
    residual = torch.randn(3, 32, dtype=torch.float64)
    left, right = memit.solve(tiny_model, "m", keys, residual, torch.eye(64, dtype=torch.float64), MEMITConfig(mom2_update_weight=1e-9))
    torch.testing.assert_close((left @ right) @ keys.T, residual.T, atol=1e-5, rtol=1e-5)
    # with a strong preservation weight the update shrinks
    left2, right2 = memit.solve(tiny_model, "m", keys, residual, torch.eye(64, dtype=torch.float64), MEMITConfig(mom2_update_weight=1e3))
    assert (left2 @ right2).norm() < 0.1 * (left @ right).norm()


def test_memit_edits_several_requests_on_its_layers_only(tiny_model, tokenizer, request_factory):
    requests = [_subject_last(request_factory, "a"), request_factory("b", prompt="The capital is Italy", subject="Italy", target_new="Paris")]
    config = MEMITConfig(layers=[0, 1], mom2_update_weight=1e-3, **TINY)
    edit = MEMIT().apply(tiny_model, tokenizer, requests, config)
    targets = get_targets(tiny_model)
    assert edit.param_names == sorted(f"{targets.layer('mlp_out', l)}.weight" for l in (0, 1))
    assert all(d.rank is None or d.rank <= 2 for d in edit.deltas.values())


def test_pmet_spreads_with_a_square_root_and_edits_mlps_only(tiny_model, tokenizer, request_factory):
    assert PMET().share(torch.tensor([4.0]), 4).item() == pytest.approx(2.0)
    assert MEMIT().share(torch.tensor([4.0]), 4).item() == pytest.approx(1.0)
    edit = get_editor("pmet")().apply(
        tiny_model, tokenizer, [_subject_last(request_factory)], get_editor("pmet").config_class(layers=[0, 1], mom2_update_weight=1e-3, **TINY)
    )
    assert all("mlp" in name for name in edit.param_names)


def test_alphaedit_update_leaves_preserved_keys_alone(tiny_model):
    torch.manual_seed(0)
    d_in = 64
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))
    eigenvalues = torch.cat([torch.full((40,), 5.0), torch.full((24,), 1e-4)]).double()
    moment = basis @ torch.diag(eigenvalues) @ basis.T  # preserved keys span the first 40 directions
    keys = torch.randn(3, d_in, dtype=torch.float64)
    residual = torch.randn(3, 32, dtype=torch.float64)
    left, right = AlphaEdit().solve(tiny_model, "m", keys, residual, moment, AlphaEditConfig(nullspace_threshold=1e-2, l2=1e-6))
    update = left @ right
    preserved = basis[:, :40]
    assert (update @ preserved).abs().max() < 1e-8
    # ... and still writes the new keys' values as far as the null space allows
    null = basis[:, 40:]
    torch.testing.assert_close(update @ (null @ null.T) @ keys.T, update @ keys.T)
    assert (update @ keys.T - residual.T).norm() < 0.5 * residual.norm()


def test_alphaedit_remembers_only_applied_edits(tiny_model, tokenizer, request_factory):
    editor = AlphaEdit()
    config = get_editor("alphaedit").config_class(layers=[1], nullspace_threshold=1e6, l2=1e-3, **{**TINY, "v_steps": 2})
    first = editor.apply(tiny_model, tokenizer, [_subject_last(request_factory, "a")], config)
    name = get_targets(tiny_model).layer("mlp_out", 1)
    assert len(editor._history[(id(tiny_model), name)]) == 1
    first.revert(tiny_model)
    editor.apply(tiny_model, tokenizer, [_subject_last(request_factory, "b")], config)
    history = editor._history[(id(tiny_model), name)]
    assert len(history) == 1 and history[0][0].case_ids == ["b"]


@pytest.mark.parametrize(
    "cls, bad",
    [
        (ROMEConfig, dict(v_steps=0)),
        (ROMEConfig, dict(kl_prompt="no subject slot")),
        (MEMITConfig, dict(layers=[3, 2])),
        (MEMITConfig, dict(layers=[])),
        (AlphaEditConfig, dict(nullspace_threshold=0.0)),
    ],
)
def test_bad_configs_are_refused(cls, bad):
    with pytest.raises(ValueError):
        cls(**bad)
