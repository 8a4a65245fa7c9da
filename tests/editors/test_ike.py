"""IKE (Zheng et al., 2023): the context mechanism, demonstration selection, generate, revert, save/load."""

from __future__ import annotations

import torch

from factedit.editors import Edit, get_editor
from factedit.editors.ike import ContextPrefix, IKEConfig, demonstrations
from factedit.editors.core.lm import collate_pairs, encode_pair, logits_at


def _config(**overrides) -> IKEConfig:
    return IKEConfig(**{"k": 1, "builtin_pool": False, **overrides})


def _context(edit) -> torch.Tensor:
    return torch.cat([edit.demo_ids, edit.fact_ids])


def test_outputs_equal_the_base_model_on_the_concatenated_text(tiny_model, tokenizer, request_factory):
    # GPT-2's 128 positions hold the copy demonstration, the fact line and a probe, not more.
    reqs = [request_factory("a", target_new="Paris")]
    pairs = [encode_pair(tokenizer, "The capital of Italy is", "Rome"), encode_pair(tokenizer, "Angola is located in", "Africa")]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        before = logits_at(tiny_model, batch)
    edit = get_editor("ike")().apply(tiny_model, tokenizer, reqs, _config())
    assert not edit.param_names and "New Fact:" in edit.info["context"]
    with torch.no_grad():
        after = logits_at(tiny_model, batch)
        full = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.equal(after, before), "the context changes the prediction"
    assert full.shape[1] == batch.input_ids.shape[1], "context positions are stripped"
    ctx = _context(edit)
    edit.revert(tiny_model)
    for row, (p, t) in enumerate(pairs):
        ids = torch.tensor([ctx.tolist() + p + t])
        with torch.no_grad():
            reference = tiny_model(input_ids=ids).logits[0, len(ctx) :]
        torch.testing.assert_close(full[row, : len(p) + len(t)], reference, rtol=1e-5, atol=1e-5)
        cols = batch.cols[batch.rows == row]
        torch.testing.assert_close(after[batch.rows == row], reference[cols], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(logits_at(tiny_model, batch), before), "revert is bit-exact"
    assert ContextPrefix.of(tiny_model) is None


def test_generate_continues_the_concatenated_text(tiny_model, tokenizer, request_factory):
    edit = get_editor("ike")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config())
    prompt = encode_pair(tokenizer, "The capital of Italy is", "Rome")[0]
    out = tiny_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ctx = _context(edit)
    edit.revert(tiny_model)
    reference = tiny_model.generate(input_ids=torch.tensor([ctx.tolist() + prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out[0, len(prompt) :].tolist() == reference[0, len(ctx) + len(prompt) :].tolist()


def test_contexts_compose_and_revert_out_of_order(tiny_model, tokenizer, request_factory):
    batch = collate_pairs([encode_pair(tokenizer, "The capital of Italy is", "Rome")], tokenizer.pad_token_id)
    with torch.no_grad():
        base = logits_at(tiny_model, batch)
    editor = get_editor("ike")()
    e1 = editor.apply(tiny_model, tokenizer, [request_factory("a", target_new="Paris")], _config(k=0))
    with torch.no_grad():
        only1 = logits_at(tiny_model, batch)
    e2 = editor.apply(tiny_model, tokenizer, [request_factory("b", prompt="Angola is located in", subject="Angola", target_new="Europe")], _config(k=0))
    expected = torch.cat([e1.demo_ids, e2.demo_ids, e1.fact_ids, e2.fact_ids])
    assert torch.equal(ContextPrefix.of(tiny_model).ids, expected), "demonstrations first, then the facts, in application order"
    e2.revert(tiny_model)
    with torch.no_grad():
        assert torch.equal(logits_at(tiny_model, batch), only1)
    e1.revert(tiny_model)
    with torch.no_grad():
        assert torch.equal(logits_at(tiny_model, batch), base)


def test_selection_picks_the_nearest_demonstrations(tiny_model, tokenizer, request_factory):
    target = request_factory("a", target_new="Paris")
    same = request_factory("b", target_new="Paris")  # the same fact: its copy demonstration is the nearest
    far = request_factory("c", prompt="When was the inception of the company", subject="company", target_new="1998", target_true="1997",
                          rephrase_prompts=(), neighborhood_prompts=())
    chosen = get_editor("ike")().select(tiny_model, tokenizer, [target, same, far], _config(k=1))
    assert chosen[0] == demonstrations(same)[0]


def test_save_load_round_trip(tiny_model, tokenizer, request_factory, tmp_path):
    batch = collate_pairs([encode_pair(tokenizer, "The capital of Italy is", "Rome")], tokenizer.pad_token_id)
    edit = get_editor("ike")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config(k=0))
    with torch.no_grad():
        edited = logits_at(tiny_model, batch)
    edit.save(tmp_path / "e")
    edit.revert(tiny_model)
    loaded = Edit.load(tmp_path / "e")
    assert torch.equal(_context(loaded), _context(edit)) and loaded.info["context"] == edit.info["context"]
    with loaded.applied(tiny_model), torch.no_grad():
        assert torch.equal(logits_at(tiny_model, batch), edited)


def test_builtin_pool_is_used(tiny_model, tokenizer, request_factory):
    edit = get_editor("ike")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], IKEConfig(k=2))
    assert edit.info["demonstrations"] == 3
    edit.revert(tiny_model)


def test_pool_file_records_come_from_the_application(tiny_model, tokenizer, request_factory):
    """The editor reads no file: ``pool_path``'s records arrive through ``read_data`` (edit.py's
    reader, here a stub that records what it was asked), and an unread ``pool_path`` is refused."""
    import pytest

    from factedit.editors import EditError

    config = _config(k=2, pool_path="pool.json", pool_limit=5)
    with pytest.raises(EditError, match="read_data"):
        get_editor("ike")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], config)
    asked = []

    def reader(path, limit):
        asked.append((path, limit))
        return [request_factory("p1", target_new="Berlin"), request_factory("p2", target_new="Madrid")]

    editor = get_editor("ike")()
    editor.read_data(config, reader)
    edit = editor.apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], config)
    assert asked == [("pool.json", 5)]
    assert edit.info["demonstrations"] == 3  # two chosen from the file's six, then the copy demonstration
    edit.revert(tiny_model)


def test_context_is_encoded_once_and_again_after_a_weight_change(tiny_model, tokenizer, request_factory):
    """Scoring passes embed only their own tokens (the context's keys and values are reused), the
    context is encoded once for any number of passes, and an in-place weight change re-encodes it."""
    seen: list[tuple[int, ...]] = []
    handle = tiny_model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    edit = get_editor("ike")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config())
    c = len(_context(edit))
    batch = collate_pairs([encode_pair(tokenizer, "The capital of Italy is", "Rome")] * 3, tokenizer.pad_token_id)
    try:
        seen.clear()
        with torch.no_grad():
            first = logits_at(tiny_model, batch)
            again = logits_at(tiny_model, batch)
        assert seen == [(1, c), tuple(batch.input_ids.shape), tuple(batch.input_ids.shape)]
        assert torch.equal(first, again)
        seen.clear()
        with torch.no_grad():
            tiny_model.get_input_embeddings().weight.mul_(1.5)
            changed = logits_at(tiny_model, batch)
            tiny_model.get_input_embeddings().weight.div_(1.5)
        assert seen == [(1, c), tuple(batch.input_ids.shape)] and not torch.allclose(changed, first)
    finally:
        handle.remove()
        edit.revert(tiny_model)


def test_generation_with_a_context_appends_to_the_cache_in_place(tiny_model, tokenizer, request_factory, monkeypatch):
    """Decoding behind a context writes each step's keys and values into spare room of the cache
    (no copy of the whole cache per step) and gives what transformers' own cache layer gives."""
    from factedit.editors.ike import editor as ike_module

    inputs = tokenizer(["The capital of Italy is"], return_tensors="pt")
    settings = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    edit = get_editor("ike")().apply(tiny_model, tokenizer, [request_factory(target_new="Paris")], _config(k=0))
    layers = []
    growing = ike_module._growing
    monkeypatch.setattr(ike_module, "_growing", lambda cache: layers.extend(type(layer).__name__ for layer in growing(cache).layers) or cache)
    try:
        with torch.no_grad():
            grown = tiny_model.generate(**inputs, **settings)
        monkeypatch.setattr(ike_module, "_growing", lambda cache: cache)
        with torch.no_grad():
            plain = tiny_model.generate(**inputs, **settings)
    finally:
        edit.revert(tiny_model)
    assert layers and set(layers) == {"_GrowingLayer"}
    assert torch.equal(grown.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(grown.scores), torch.stack(plain.scores), rtol=1e-5, atol=1e-5)
