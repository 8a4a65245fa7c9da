"""Key statistics: the value matches a direct computation, caching is keyed and safe, ROME files load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factedit.editors.base import Edit, ParamDelta
from factedit.editors.core.hooks import trace
from factedit.editors.core import corpus, stats
from factedit.editors.core.stats import layer_statistics, load_rome_npz, second_moments
from factedit.models import model_fingerprint
from factedit.editors.core.targets import get_module, get_targets

TEXTS = ["The capital of France is Paris.", "Angola is located in Africa.", "", "Toko Yasuda plays the guitar. It is loud."]


def test_second_moment_matches_direct_computation(tiny_model, tokenizer):
    name = get_targets(tiny_model).layer("mlp_out", 1)
    stats = second_moments(tiny_model, tokenizer, [name], TEXTS, max_texts=10, batch_size=2, progress=False)[name]
    keys = []
    for text in TEXTS:
        if not text:
            continue
        with torch.no_grad(), trace(tiny_model, [name]) as traced:
            tiny_model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
        keys.append(traced[name].input[0].double())
    keys = torch.cat(keys)
    assert stats.count == keys.shape[0]
    assert torch.allclose(stats.moment(), keys.T @ keys / keys.shape[0], rtol=1e-5, atol=1e-7)
    assert stats.total.dtype == torch.float64


def test_max_texts_limits_the_sample(tiny_model, tokenizer):
    name = get_targets(tiny_model).layer("mlp_out", 0)
    one = second_moments(tiny_model, tokenizer, [name], TEXTS, max_texts=1, progress=False)[name]
    assert one.count == len(tokenizer(TEXTS[0])["input_ids"])


def _cached(model, tokenizer, name, tmp_path, **kwargs):
    """The statistics of ``name`` over TEXTS (a corpus file), through the cache in ``tmp_path``."""
    path = tmp_path / "corpus.txt"
    if not path.exists():
        path.write_text("\n\n".join(t for t in TEXTS if t))
    return layer_statistics(model, tokenizer, [name], corpus=str(path), n_texts=10, max_length=32, cache_dir=tmp_path / "stats", progress=False, **kwargs)[name]


def test_cache_is_reused_and_keyed_by_weights(tiny_model, tokenizer, tmp_path, monkeypatch):
    name = get_targets(tiny_model).layer("mlp_out", 1)
    first = _cached(tiny_model, tokenizer, name, tmp_path)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 1
    real = stats.second_moments
    monkeypatch.setattr(stats, "second_moments", lambda *a, **k: pytest.fail("recomputed although cached"))
    again = _cached(tiny_model, tokenizer, name, tmp_path)
    assert torch.equal(again.total, first.total) and again.count == first.count
    monkeypatch.setattr(stats, "second_moments", real)
    # An edit changes the fingerprint, so the statistics are recomputed for the edited model...
    fingerprint = model_fingerprint(tiny_model)
    earlier = dict(tiny_model.named_parameters())[f"{get_targets(tiny_model).layer('mlp_out', 0)}.weight"]
    edit = Edit("t", {f"{get_targets(tiny_model).layer('mlp_out', 0)}.weight": ParamDelta(delta=torch.ones_like(earlier))}).apply(tiny_model)
    assert model_fingerprint(tiny_model) != fingerprint
    _cached(tiny_model, tokenizer, name, tmp_path)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2
    # ...unless the caller pins the unedited model's identity.
    monkeypatch.setattr(stats, "second_moments", lambda *a, **k: pytest.fail("recomputed although pinned"))
    pinned = _cached(tiny_model, tokenizer, name, tmp_path, model_id=fingerprint)
    assert torch.equal(pinned.total, first.total)
    edit.revert(tiny_model)
    assert model_fingerprint(tiny_model) == fingerprint


def test_fingerprint_ignores_where_the_model_came_from(tiny_model):
    fingerprint = model_fingerprint(tiny_model)
    tiny_model.config._name_or_path = "/somewhere/else"
    tiny_model.config.transformers_version = "0.0.1"
    assert model_fingerprint(tiny_model) == fingerprint
    tiny_model.config.layer_norm_epsilon = 0.5  # a setting that changes the outputs does count
    tiny_model.config.rms_norm_eps = 0.5
    assert model_fingerprint(tiny_model) != fingerprint


def test_damaged_cache_is_recomputed(tiny_model, tokenizer, tmp_path):
    name = get_targets(tiny_model).layer("mlp_out", 1)
    first = _cached(tiny_model, tokenizer, name, tmp_path)
    [entry] = (tmp_path / "stats").glob("*.safetensors")
    entry.write_bytes(b"damaged")
    again = _cached(tiny_model, tokenizer, name, tmp_path)
    assert torch.equal(again.total, first.total)


def test_load_rome_npz(tmp_path):
    total = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.savez(tmp_path / "stats.npz", **{"mom2.mom2": total, "mom2.count": np.array(3)})
    stats = load_rome_npz(tmp_path / "stats.npz")
    assert stats.count == 3 and torch.equal(stats.moment(), torch.from_numpy(total) / 3)
    np.savez(tmp_path / "other.npz", something=total)
    with pytest.raises(ValueError, match="mom2.count"):
        load_rome_npz(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.npz"):
        load_rome_npz(tmp_path / "broken.npz")


def test_second_moments_share_one_pass_and_match_single_modules(tiny_model, tokenizer):
    targets = get_targets(tiny_model)
    names = [targets.layer("mlp_out", 1), targets.layer("mlp_out", 0)]
    together = second_moments(tiny_model, tokenizer, names, TEXTS, max_texts=10, batch_size=2, progress=False)
    assert list(together) == names
    for name in names:
        alone = second_moments(tiny_model, tokenizer, [name], TEXTS, max_texts=10, batch_size=2, progress=False)[name]
        assert together[name].count == alone.count
        assert torch.allclose(together[name].total, alone.total, rtol=1e-10, atol=1e-12)
        keys = []
        for text in TEXTS:
            if text:
                with torch.no_grad(), trace(tiny_model, [name]) as traced:
                    tiny_model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
                keys.append(traced[name].input[0].double())
        keys = torch.cat(keys)
        assert together[name].count == keys.shape[0]
        assert torch.allclose(together[name].total, keys.T @ keys, rtol=1e-5, atol=1e-7)


def test_second_moments_stop_after_the_deepest_module(tiny_model, tokenizer):
    targets = get_targets(tiny_model)
    names = [targets.layer("mlp_out", 1), targets.layer("mlp_out", 0)]
    later = [targets.layer("mlp", 2), targets.final_norm, targets.unembed]
    calls = {name: 0 for name in [*names, *later]}
    handles = []
    for name in calls:

        def count(module, args, output, name=name):
            calls[name] += 1

        handles.append(get_module(tiny_model, name).register_forward_hook(count))
    try:
        second_moments(tiny_model, tokenizer, names, TEXTS, max_texts=10, batch_size=2, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[names[0]] == calls[names[1]] == 2  # two batches
    assert all(calls[name] == 0 for name in later), calls
    assert all(not get_module(tiny_model, name)._forward_hooks for name in names), "hooks left behind"


def test_second_moments_name_modules_that_never_run(tiny_model, tokenizer):
    tiny_model.add_module("unused", torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"\['unused'\] were not called"):
        second_moments(tiny_model, tokenizer, ["unused", get_targets(tiny_model).layer("mlp_out", 0)], TEXTS, max_texts=1, progress=False)


def test_layer_statistics_cache_each_module_and_sample_only_when_needed(tokenizer, tmp_path, monkeypatch):
    from helpers import build_llama

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    model = build_llama(len(tokenizer))
    targets = get_targets(model)
    computed, sampled = [], []
    real_moments, real_samples = stats.second_moments, corpus.model_samples
    monkeypatch.setattr(stats, "second_moments", lambda model, tok, names, *a, **k: computed.append(list(names)) or real_moments(model, tok, names, *a, **k))
    monkeypatch.setattr(corpus, "model_samples", lambda *a, **k: sampled.append(a[2]) or real_samples(*a, **k))
    args = dict(n_texts=6, max_length=16, batch_size=4, progress=False)
    first = layer_statistics(model, tokenizer, [targets.layer("mlp_out", 1)], **args)
    assert computed == [[targets.layer("mlp_out", 1)]] and sampled == [6]
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 1
    # One more module: only it is computed, from the cached samples.
    both = layer_statistics(model, tokenizer, [targets.layer("mlp_out", 0), targets.layer("mlp_out", 1)], **args)
    assert computed[-1] == [targets.layer("mlp_out", 0)] and sampled == [6]
    assert torch.equal(both[targets.layer("mlp_out", 1)].total, first[targets.layer("mlp_out", 1)].total)
    # They are the statistics of the cached samples.
    texts = corpus.open_corpus("model", model, tokenizer, 6, length=16, progress=False).load()
    direct = second_moments(model, tokenizer, [targets.layer("mlp_out", 0)], texts, max_texts=6, max_length=16, progress=False)[targets.layer("mlp_out", 0)]
    assert torch.allclose(both[targets.layer("mlp_out", 0)].total, direct.total) and sampled == [6]
    # Everything cached: nothing is computed, and the corpus is not even read.
    computed.clear()
    monkeypatch.setattr(corpus, "_read_samples", lambda *a: pytest.fail("corpus read although all statistics are cached"))
    again = layer_statistics(model, tokenizer, [targets.layer("mlp_out", 1), targets.layer("mlp_out", 0)], **args)
    assert computed == [] and list(again) == [targets.layer("mlp_out", 1), targets.layer("mlp_out", 0)]
    for name in again:
        assert torch.equal(again[name].total, both[name].total) and again[name].count == both[name].count


def test_layer_statistics_of_a_file_follow_its_content(tiny_model, tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXTS))
    name = get_targets(tiny_model).layer("mlp_out", 2)
    args = dict(corpus=str(path), n_texts=10, max_length=32, cache_dir=tmp_path / "stats", progress=False)
    result = layer_statistics(tiny_model, tokenizer, [name], **args)[name]
    expected = second_moments(tiny_model, tokenizer, [name], [t for t in TEXTS if t], max_texts=10, max_length=32, progress=False)[name]
    assert result.count == expected.count and torch.allclose(result.total, expected.total)
    path.write_text("Something else entirely.")
    changed = layer_statistics(tiny_model, tokenizer, [name], **args)[name]
    assert changed.count != result.count
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2
