"""``edit.py`` refuses what cannot work with a short error naming the option or file, before any
case is scored: records longer than the model's context, bad devices, dtypes, data paths and
model files, architectures missing from the targets table, FT layers out of range; ROME/MEMIT
key statistics fit their sample length to the model."""

from __future__ import annotations

import json

import pytest
import torch

import factedit.evaluation.measuring as measuring
from factedit.editors import get_editor
from factedit.editors.core.stats import layer_statistics
from factedit.editors.core.targets import get_targets
from factedit import models
from factedit.evaluation.cli import main
from factedit.evaluation.run_dir import read_jsonl

LONG_PROMPT = "Xq zv " * 80 + "{} is located in"  # ~480 tokens: more than the tiny GPT-2's 128 positions


@pytest.fixture
def gpt2_dir(tmp_path, tokenizer):
    from helpers import build_gpt2

    directory = tmp_path / "tiny-gpt2"
    build_gpt2(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _counterfact(path, prompts):
    rows = [
        {
            "case_id": f"cf{i}",
            "requested_rewrite": {"prompt": prompt, "subject": "Angola", "target_new": {"str": "Antarctica"}, "target_true": {"str": "Africa"}, "relation_id": "P1"},
            "paraphrase_prompts": ["Indeed. Angola is located in"],
            "neighborhood_prompts": ["The capital of Italy is"],
            "attribute_prompts": [],
            "generation_prompts": ["Angola is"],
        }
        for i, prompt in enumerate(prompts)
    ]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    return _counterfact(tmp_path / "cf.json", ["{} is located in", "The continent of {} is"])


@pytest.fixture
def scored(monkeypatch):
    """The case ids measured by the runner: empty when a run stops before scoring."""
    calls: list[str] = []
    real = measuring.measure_cases
    monkeypatch.setattr(measuring, "measure_cases", lambda model, tok, requests, config, **kw: calls.extend(r.case_id for r in requests) or real(model, tok, requests, config, **kw))
    return calls


def _cli(model, data, out, *extra):
    args = ["--editor", "ft_m", "--model", str(model), "--data", str(data), "--out", str(out), "--editor.layers", "[1]", "--editor.steps", "2"]
    return main(args + ["--eval.generation_length", "4", "--eval.fluency", "false", "--progress", "false", *extra])


def test_record_longer_than_the_context_is_refused_at_load_time(gpt2_dir, tmp_path, scored):
    data = _counterfact(tmp_path / "long.json", ["{} is located in", LONG_PROMPT, "The continent of {} is"])
    with pytest.raises(SystemExit) as err:
        _cli(gpt2_dir, data, tmp_path / "refused")
    message = str(err.value)
    assert "long.json" in message and "case_id cf1" in message and "'prompt'" in message and "128 positions" in message
    assert "--skip_invalid" in message and scored == []
    summary = _cli(gpt2_dir, data, tmp_path / "skipping", "--skip_invalid")
    assert summary["cases"] == 2 and summary["failed_cases"] == 0
    assert len(summary["skipped_records"]) == 1 and "case_id cf1" in summary["skipped_records"][0]
    assert [r["case_id"] for r in read_jsonl(tmp_path / "skipping" / "cases.jsonl")] == ["cf0", "cf2"]


def test_generation_beyond_the_context_names_the_setting(gpt2_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match=r"generation_prompts\[0\].*--eval.generation_length 200"):
        _cli(gpt2_dir, data_file, tmp_path / "out", "--eval.fluency", "true", "--eval.generation_length", "200")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(gpt2_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match=r"--device cuda: .*no CUDA device.*--device cpu"):
        _cli(gpt2_dir, data_file, tmp_path / "out", "--device", "cuda")


def test_unknown_device_and_dtype(gpt2_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match=r"--dtype 'float33' is not a supported dtype; use one of float32"):
        _cli(gpt2_dir, data_file, tmp_path / "a", "--dtype", "float33")
    with pytest.raises(SystemExit, match=r"--device 'gpu' is not a device name"):
        _cli(gpt2_dir, data_file, tmp_path / "b", "--device", "gpu")


def test_data_that_is_a_folder_or_missing(gpt2_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--data: .* is not a file; pass a JSON or JSONL file"):
        _cli(gpt2_dir, tmp_path, tmp_path / "a")
    with pytest.raises(SystemExit, match=r"--data: .*missing.json.* is neither an existing file nor a known data set"):
        _cli(gpt2_dir, tmp_path / "missing.json", tmp_path / "b")


def test_corrupt_safetensors_is_named(gpt2_dir, data_file, tmp_path):
    weights = gpt2_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    with pytest.raises(SystemExit, match=r"model\.safetensors: damaged or not a safetensors file"):
        _cli(gpt2_dir, data_file, tmp_path / "a")
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(models.ModelLoadError, match=r"model\.safetensors: damaged"):
        models.load_model(str(gpt2_dir), device="cpu")


def test_garbage_gguf_is_named(data_file, tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(SystemExit, match=r"model\.gguf: not a GGUF file"):
        _cli(garbage, data_file, tmp_path / "a")


def test_architecture_missing_from_the_targets_table(tmp_path, tokenizer, data_file, scored):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=len(tokenizer), max_position_embeddings=128, hidden_size=32, num_layers=2, attention_types=[[["global"], 2]], num_heads=2)
    directory = tmp_path / "tiny-neo"
    GPTNeoForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with pytest.raises(SystemExit, match=r"'gpt_neo' is not in the target table.*Set --editor.targets"):
        _cli(directory, data_file, tmp_path / "a")
    assert scored == []


def test_ft_layer_out_of_range_is_refused_before_scoring(gpt2_dir, data_file, tmp_path, scored):
    with pytest.raises(SystemExit, match=r"--editor.*layers entry 7 is out of range for a model with 3 blocks: use 0 to 2, or -1 to -3"):
        _cli(gpt2_dir, data_file, tmp_path / "a", "--editor.layers", "[7]")
    assert scored == []


def test_ft_accepts_negative_layers_counted_from_the_last(tokenizer, request_factory):
    from helpers import build_gpt2

    model = build_gpt2(len(tokenizer))
    editor = get_editor("ft_m")()
    edit = editor.apply(model, tokenizer, [request_factory()], editor.config_class(layers=[-1], steps=2, lr=1e-2))
    assert list(edit.deltas) == [get_targets(model).layer("mlp_out", 2) + ".weight"]
    edit.revert(model)


def test_statistics_samples_longer_than_the_context_are_clamped(tokenizer, isolated_cache):
    from helpers import build_gpt2

    model = build_gpt2(len(tokenizer))  # 128 positions; ROME's default sample length is 128 tokens after the start token
    name = get_targets(model).layer("mlp_out", 1)
    moments = layer_statistics(model, tokenizer, [name], n_texts=2, max_length=500, batch_size=2, progress=False)
    assert moments[name].count > 0 and torch.isfinite(moments[name].total).all()


def test_every_probe_is_checked_and_a_group_is_one_record(tokenizer, request_factory):
    from helpers import build_gpt2

    from factedit.editors.base import QA
    from factedit.evaluation.preflight import requests_that_fit
    from factedit.evaluation.scoring import EvalConfig

    model = build_gpt2(len(tokenizer))
    long = "Xq zv " * 80 + "Rome is in"
    requests = [
        request_factory("a"),
        request_factory("b", locality=(QA("The capital of Italy is", "Rome"), QA(long, "Italy"))),
        request_factory("c", group="g"),
        request_factory("d", group="g", rephrase_prompts=("Danielle Darrieux speaks", long + " Danielle Darrieux")),
    ]
    kept, errors = requests_that_fit(model, tokenizer, requests, EvalConfig(fluency=False), "data.json")
    assert [r.case_id for r in kept] == ["a"]
    assert [(e.case_id, e.field) for e in errors] == [("b", "locality[1]"), ("g", "rephrase_prompts[1]")]
    assert str(errors[0]).startswith("data.json: case_id b: field 'locality[1]': ")
