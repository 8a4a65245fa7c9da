"""Key statistics: the value matches a direct computation, caching is keyed and safe, ROME files load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editors.base import Edit, ParamDelta
from editors.hooks import trace
from editors.stats import cached_second_moment, load_rome_npz, model_fingerprint, second_moment
from editors.targets import get_targets

TEXTS = ["The capital of France is Paris.", "Angola is located in Africa.", "", "Toko Yasuda plays the guitar. It is loud."]


def test_second_moment_matches_direct_computation(tiny_model, tokenizer):
    name = get_targets(tiny_model).layer("mlp_out", 1)
    stats = second_moment(tiny_model, tokenizer, name, TEXTS, max_texts=10, batch_size=2, progress=False)
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
    one = second_moment(tiny_model, tokenizer, name, TEXTS, max_texts=1, progress=False)
    assert one.count == len(tokenizer(TEXTS[0])["input_ids"])


def test_cache_is_reused_and_keyed_by_weights(tiny_model, tokenizer, tmp_path):
    name = get_targets(tiny_model).layer("mlp_out", 1)
    args = dict(corpus_id="unit", cache_dir=tmp_path, max_texts=10, progress=False)
    first = cached_second_moment(tiny_model, tokenizer, name, TEXTS, **args)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    # Reused: an empty corpus would fail if it were recomputed.
    again = cached_second_moment(tiny_model, tokenizer, name, [], **args)
    assert torch.equal(again.total, first.total) and again.count == first.count
    # An edit changes the fingerprint, so the statistics are recomputed for the edited model...
    fingerprint = model_fingerprint(tiny_model)
    earlier = dict(tiny_model.named_parameters())[f"{get_targets(tiny_model).layer('mlp_out', 0)}.weight"]
    edit = Edit("t", {f"{get_targets(tiny_model).layer('mlp_out', 0)}.weight": ParamDelta(delta=torch.ones_like(earlier))}).apply(tiny_model)
    assert model_fingerprint(tiny_model) != fingerprint
    cached_second_moment(tiny_model, tokenizer, name, TEXTS, **args)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # ...unless the caller pins the unedited model's identity.
    pinned = cached_second_moment(tiny_model, tokenizer, name, [], model_id=fingerprint, **args)
    assert torch.equal(pinned.total, first.total)
    edit.revert(tiny_model)
    assert model_fingerprint(tiny_model) == fingerprint


def test_damaged_cache_is_recomputed(tiny_model, tokenizer, tmp_path):
    name = get_targets(tiny_model).layer("mlp_out", 1)
    args = dict(corpus_id="unit", cache_dir=tmp_path, max_texts=10, progress=False)
    first = cached_second_moment(tiny_model, tokenizer, name, TEXTS, **args)
    [entry] = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"damaged")
    again = cached_second_moment(tiny_model, tokenizer, name, TEXTS, **args)
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
