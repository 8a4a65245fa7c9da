"""KN (knowledge neurons): integrated gradients, neuron refining, the low-rank slot update."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import get_editor
from factedit.editors.core.hooks import edit_input
from factedit.editors.kn import KNConfig, LastPosition, integrated_gradients, select_neurons
from factedit.editors.core.lm import encode_pair, hidden_states, unembed
from factedit.editors.core.targets import get_module, get_targets, is_transposed, weight_as_out_in

# Strong enough for the tiny random models (as in tests/editors/test_editors.py).
SETTINGS = dict(lambda_new=100.0, max_neurons=10)


def _prompt_ids(tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, int]:
    prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
    return torch.tensor([prompt_ids]), answer_ids[0]


def _slow_integrated_gradients(model, input_ids, module_name, activation, target_id, steps) -> torch.Tensor:
    """Eq. 4 the slow way: the whole prompt, one alpha at a time, no cache."""
    total = torch.zeros_like(activation, dtype=torch.float32)
    for k in range(1, steps + 1):
        point = (k / steps * activation).clone().requires_grad_(True)

        def substitute(x):
            x = x.clone()
            x[0, -1] = point
            return x

        with edit_input(model, module_name, substitute):
            hidden = hidden_states(model, input_ids, torch.ones_like(input_ids))
            prob = torch.softmax(unembed(model, hidden[0, -1]), dim=-1)[target_id]
        (grad,) = torch.autograd.grad(prob, point)
        total += grad
    return activation * total / steps


def _probability(model, input_ids, target_id, module_name=None, activation=None) -> float:
    """P(target) at the last position, optionally with ``module_name``'s input there replaced."""

    def substitute(x):
        x = x.clone()
        x[0, -1] = activation
        return x

    with torch.no_grad():
        if module_name is None:
            hidden = hidden_states(model, input_ids, torch.ones_like(input_ids))
        else:
            with edit_input(model, module_name, substitute):
                hidden = hidden_states(model, input_ids, torch.ones_like(input_ids))
        return float(torch.softmax(unembed(model, hidden[0, -1]), dim=-1)[target_id])


def test_batched_integrated_gradients_match_a_loop_over_alphas(tiny_model, tokenizer):
    tiny_model.requires_grad_(False)
    input_ids, target_id = _prompt_ids(tokenizer, "The mother tongue of Danielle Darrieux is", "French")
    module_name = get_targets(tiny_model).layer("mlp_out", 1)
    prompt = LastPosition(tiny_model, input_ids)
    activation = prompt.activations([module_name])[0]

    fast = integrated_gradients(prompt, module_name, activation, target_id, steps=7)
    slow = _slow_integrated_gradients(tiny_model, input_ids, module_name, activation, target_id, steps=7)
    assert fast.shape == activation.shape
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-9)


def test_attributions_add_up_to_the_change_of_probability(tiny_model, tokenizer):
    # Completeness of integrated gradients: the attributions of one layer sum to
    # P(observed activation) - P(zero activation at the last position), up to the Riemann error.
    tiny_model.requires_grad_(False)
    input_ids, target_id = _prompt_ids(tokenizer, "The capital of France is", "Paris")
    module_name = get_targets(tiny_model).layer("mlp_out", 0)
    prompt = LastPosition(tiny_model, input_ids)
    activation = prompt.activations([module_name])[0]
    attribution = integrated_gradients(prompt, module_name, activation, target_id, steps=200)
    change = _probability(tiny_model, input_ids, target_id) - _probability(tiny_model, input_ids, target_id, module_name, torch.zeros_like(activation))
    assert abs(change) > 0
    assert float(attribution.sum()) == pytest.approx(change, rel=0.02, abs=1e-7)


def _constructed_attributions() -> torch.Tensor:
    scores = torch.zeros(3, 2, 4)  # [prompts, layers, neurons]
    scores[:, 0, 0] = 1.0  # the best of prompts 0 and 1
    scores[:, 1, 2] = torch.tensor([0.5, 0.5, 0.0])
    scores[:, 0, 3] = torch.tensor([0.9, 0.0, 0.0])
    scores[:, 1, 1] = 0.1  # never above 0.2 * a prompt's best
    scores[2, 1, 3] = 10.0  # prompt 2's best: its threshold is 2.0, so only this neuron passes there
    return scores


def test_selection_keeps_neurons_above_threshold_shared_by_enough_prompts():
    scores = _constructed_attributions()
    # Coarse sets (> 0.2 * each prompt's best): prompt 0 {(0,0), (1,2), (0,3)}, prompt 1 {(0,0), (1,2)},
    # prompt 2 {(1,3)}. Shared by at least half of 3 prompts (2 of them): (0,0) and (1,2); (1,3) has the
    # largest mean attribution but only one prompt's vote.
    chosen = select_neurons(scores, threshold=0.2, share=0.5, max_neurons=None)
    assert not chosen.threshold_selected_none
    assert [n[:2] for n in chosen.neurons] == [(0, 0), (1, 2)]  # best mean attribution first
    assert [n[2] for n in chosen.neurons] == pytest.approx([1.0, 1 / 3])

    assert [n[:2] for n in select_neurons(scores, 0.2, share=0.5, max_neurons=1).neurons] == [(0, 0)]
    assert [n[:2] for n in select_neurons(scores, 0.2, share=0.3, max_neurons=None).neurons] == [(1, 3), (0, 0), (1, 2), (0, 3)]
    assert [n[:2] for n in select_neurons(scores, 0.6, share=0.5, max_neurons=None).neurons] == [(0, 0)]  # 0.5 < 0.6


def test_selection_falls_back_to_the_mean_when_the_threshold_selects_none():
    # No neuron is in all three coarse sets; the mean attributions (1,3): 10/3, (0,0): 1, (1,2): 1/3,
    # (0,3): 0.3 are thresholded at 0.2 * 10/3 instead.
    chosen = select_neurons(_constructed_attributions(), threshold=0.2, share=1.0, max_neurons=None)
    assert chosen.threshold_selected_none
    assert [n[:2] for n in chosen.neurons] == [(1, 3), (0, 0)]
    # A prompt without a positive attribution votes for nothing; the best mean is still kept.
    chosen = select_neurons(-torch.rand(2, 1, 5) - 0.1, threshold=0.2, share=0.5, max_neurons=None)
    assert chosen.threshold_selected_none and len(chosen.neurons) == 1


def _apply_kn(model, tokenizer, request, **settings):
    editor = get_editor("kn")
    return editor().apply(model, tokenizer, [request], KNConfig(**{**SETTINGS, **settings}))


def _neurons_by_layer(edit) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for case in edit.info["requests"]:
        for neuron in case["neurons"]:
            by_layer.setdefault(neuron["layer"], []).append(neuron["index"])
    return by_layer


def test_edit_is_stored_low_rank_with_one_factor_column_per_neuron(tiny_model, tokenizer, request_factory):
    edit = _apply_kn(tiny_model, tokenizer, request_factory(target_new="Paris"))
    targets = get_targets(tiny_model)
    by_layer = _neurons_by_layer(edit)
    assert sum(map(len, by_layer.values())) == len(edit.info["requests"][0]["neurons"]) > 0
    assert edit.param_names == sorted(f"{targets.layer('mlp_out', layer)}.weight" for layer in by_layer)
    expected_values = 0
    for layer, neurons in by_layer.items():
        name = f"{targets.layer('mlp_out', layer)}.weight"
        delta = edit.deltas[name]
        out_features, in_features = weight_as_out_in(get_module(tiny_model, targets.layer("mlp_out", layer))).shape
        assert delta.delta is None and delta.rank == len(neurons)
        assert sum(t.numel() for t in delta.tensors().values()) == (out_features + in_features) * len(neurons)
        expected_values += (out_features + in_features) * len(neurons)
    assert edit.num_stored_values() == expected_values
    assert edit.num_stored_values() < sum(p.numel() for n, p in tiny_model.named_parameters() if n in edit.deltas)


def test_update_writes_the_value_slots_of_the_selected_neurons(tiny_model, tokenizer, request_factory):
    # Column j of the weight viewed [out, in] changes by sign(activation) * (lambda_new * E[new] -
    # lambda_erase * E[true]); every other column stays. For GPT-2's Conv1D ([in, out]) that is row j
    # of the stored parameter: the orientation check.
    request = request_factory(target_new="Paris", target_true="French")
    targets = get_targets(tiny_model)
    modules = {i: get_module(tiny_model, targets.layer("mlp_out", i)) for i in range(3)}
    before = {i: weight_as_out_in(m).detach().clone() for i, m in modules.items()}
    edit = _apply_kn(tiny_model, tokenizer, request, lambda_erase=3.0)
    assert is_transposed(modules[0]) == (tiny_model.config.model_type == "gpt2")
    for name, delta in edit.deltas.items():
        assert delta.dense().shape == dict(tiny_model.named_parameters())[name].shape

    embeddings = tiny_model.get_output_embeddings().weight.detach()
    new_id = encode_pair(tokenizer, request.prompt, request.target_new)[1][0]
    true_id = encode_pair(tokenizer, request.prompt, request.target_true)[1][0]
    update = 100.0 * embeddings[new_id] - 3.0 * embeddings[true_id]
    expected = {i: torch.zeros_like(w) for i, w in before.items()}
    for neuron in edit.info["requests"][0]["neurons"]:
        sign = 1.0 if neuron["activation"] >= 0 else -1.0
        expected[neuron["layer"]][:, neuron["index"]] += sign * update
    for i, module in modules.items():
        torch.testing.assert_close(weight_as_out_in(module).detach() - before[i], expected[i], rtol=1e-5, atol=1e-4)


def test_unknown_true_answer_attributes_the_new_one_and_erases_nothing(tiny_model, tokenizer, request_factory):
    request = request_factory(target_new="Paris", target_true=None)
    edit = _apply_kn(tiny_model, tokenizer, request, sign_aware=False)
    case = edit.info["requests"][0]
    assert case["attributed"] == "target_new" and case["case_id"] == request.case_id
    embeddings = tiny_model.get_output_embeddings().weight.detach()
    new_id = encode_pair(tokenizer, request.prompt, request.target_new)[1][0]
    for name, delta in edit.deltas.items():
        module = get_module(tiny_model, name.removesuffix(".weight"))
        columns = delta.right.T if is_transposed(module) else delta.left  # [out, k] either way
        for column in columns.T:
            torch.testing.assert_close(column, 100.0 * embeddings[new_id])


def test_attribution_leaves_gradient_flags_as_found(tiny_model, tokenizer, request_factory):
    flags = {n: i % 2 == 0 for i, (n, _) in enumerate(tiny_model.named_parameters())}
    for n, p in tiny_model.named_parameters():
        p.requires_grad_(flags[n])
    _apply_kn(tiny_model, tokenizer, request_factory(target_new="Paris"), layers=[0, 2], max_prompts=1)
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_model.parameters())


def test_only_the_configured_layers_are_edited(tiny_model, tokenizer, request_factory):
    edit = _apply_kn(tiny_model, tokenizer, request_factory(target_new="Paris"), layers=[2])
    assert set(_neurons_by_layer(edit)) == {2}
    assert edit.param_names == [f"{get_targets(tiny_model).layer('mlp_out', 2)}.weight"]
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        _apply_kn(tiny_model, tokenizer, request_factory(target_new="Paris"), layers=[7])


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(layers=[]), "layers"),
        (dict(layers=[0, 0]), "repeat"),
        (dict(layers=[-1]), "non-negative"),
        (dict(steps=0), "steps"),
        (dict(threshold=1.0), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(share=0.0), "share"),
        (dict(share=1.5), "share"),
        (dict(max_neurons=0), "max_neurons"),
        (dict(max_prompts=0), "max_prompts"),
        (dict(lambda_new=-1.0), "lambda_new"),
        (dict(lambda_erase=float("nan")), "lambda_erase"),
        (dict(lambda_erase=0.0, lambda_new=0.0), "both 0"),
    ],
)
def test_bad_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        KNConfig(**bad)
