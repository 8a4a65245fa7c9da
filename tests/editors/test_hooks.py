"""Tracing and editing module inputs/outputs: values match a manual computation, hooks go away."""

from __future__ import annotations

import pytest
import torch

from factedit.editors.core.hooks import edit_input, edit_output, trace
from factedit.editors.core.targets import get_module, get_targets, weight_as_out_in


def _ids(tokenizer):
    return torch.tensor([tokenizer("The capital of France is")["input_ids"]])


def test_trace_reads_mlp_keys_and_output(tiny_model, tokenizer):
    targets = get_targets(tiny_model)
    name = targets.layer("mlp_out", 1)
    module = get_module(tiny_model, name)
    with torch.no_grad(), trace(tiny_model, [name], inputs=True, outputs=True) as traced:
        tiny_model(input_ids=_ids(tokenizer))
    record = traced[name]
    assert record.calls == 1
    expected = record.input @ weight_as_out_in(module).T + module.bias if getattr(module, "bias", None) is not None else record.input @ weight_as_out_in(module).T
    assert torch.allclose(record.output, expected, atol=1e-5)
    assert not module._forward_hooks, "hook left behind"


def test_edit_output_changes_logits_and_is_removed_even_on_error(tiny_model, tokenizer):
    name = get_targets(tiny_model).layer("mlp", 1)
    ids = _ids(tokenizer)
    with torch.no_grad():
        before = tiny_model(input_ids=ids).logits
        with edit_output(tiny_model, name, lambda out: out + 1.0):
            edited = tiny_model(input_ids=ids).logits
        after = tiny_model(input_ids=ids).logits
    assert not torch.allclose(before, edited)
    assert torch.equal(before, after)
    with pytest.raises(RuntimeError, match="boom"):
        with edit_output(tiny_model, name, lambda out: out):
            raise RuntimeError("boom")
    assert not get_module(tiny_model, name)._forward_hooks


def test_edit_input_zeroing_keys_zeroes_the_projection(tiny_model, tokenizer):
    name = get_targets(tiny_model).layer("mlp_out", 0)
    module = get_module(tiny_model, name)
    with torch.no_grad(), edit_input(tiny_model, name, torch.zeros_like), trace(tiny_model, [name], inputs=False, outputs=True) as traced:
        tiny_model(input_ids=_ids(tokenizer))
    bias = getattr(module, "bias", None)
    expected = torch.zeros_like(traced[name].output) + (bias if bias is not None else 0)
    assert torch.allclose(traced[name].output, expected)
    assert not module._forward_pre_hooks


def test_trace_without_detach_keeps_gradients(tiny_model, tokenizer):
    name = get_targets(tiny_model).layer("mlp_out", 2)
    with trace(tiny_model, [name], inputs=False, outputs=True, detach=False) as traced:
        tiny_model(input_ids=_ids(tokenizer))
    traced[name].output.sum().backward()
    assert get_module(tiny_model, name).weight.grad is not None


def test_trace_with_stop_matches_a_full_pass_and_skips_the_rest(tiny_model, tokenizer):
    targets = get_targets(tiny_model)
    name = targets.layer("mlp_out", 0)
    later = get_module(tiny_model, targets.layer("mlp", 2))  # the last block's MLP
    calls = []
    handle = later.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad(), trace(tiny_model, [name]) as traced:
        tiny_model(input_ids=_ids(tokenizer))
    assert calls == [1]
    after_the_pass = []
    with torch.no_grad(), trace(tiny_model, [name], outputs=True, stop=True) as stopped:
        tiny_model(input_ids=_ids(tokenizer))
        after_the_pass.append(1)  # skipped: the pass ended at the traced module
    handle.remove()
    assert calls == [1] and after_the_pass == [], "layers after the module still ran"
    assert torch.equal(stopped[name].input, traced[name].input) and stopped[name].calls == 1
    assert not get_module(tiny_model, name)._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), trace(tiny_model, [name], stop=True):
        raise RuntimeError("boom")  # other errors pass through


