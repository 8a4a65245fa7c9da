"""CUDA paths (marked gpu; run with ``python -m pytest -m gpu`` on a machine with a GPU)."""

from __future__ import annotations

import pytest
import torch

from factedit.editors import get_editor
from factedit.evaluation.run_dir import read_jsonl
from factedit.evaluation.runner import EditRun
from factedit.evaluation.scoring import EvalConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_edit_run_on_cuda_matches_cpu(tiny_model, tokenizer, request_factory, tmp_path):
    requests = [request_factory("0", target_new="Paris"), request_factory("1", prompt="The capital of Italy is", subject="Italy", target_new="Paris", target_true="Rome")]
    editor = get_editor("ft_m")()
    config = editor.config_class(layers=[1], lr=1e-2, steps=20)
    eval_config = EvalConfig(fluency=False)
    cpu = EditRun(tiny_model, tokenizer, editor, config, requests, tmp_path / "cpu", eval_config=eval_config, progress=False).run()
    model = tiny_model.to("cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gpu = EditRun(model, tokenizer, editor, config, requests, tmp_path / "gpu", eval_config=eval_config, progress=False).run()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert gpu["metrics"]["peak_memory_mb"] > 0
    for key in ("pre_reliability", "pre_es", "pre_ns"):
        assert gpu["metrics"][key] == pytest.approx(cpu["metrics"][key])
    assert gpu["metrics"]["reliability"] == 1.0 == cpu["metrics"]["reliability"]
    assert len(read_jsonl(tmp_path / "gpu" / "cases.jsonl")) == 2


def test_edit_applies_and_reverts_on_cuda_in_bfloat16(tiny_model, tokenizer, request_factory):
    model = tiny_model.to("cuda", torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = get_editor("ft_m")
    edit = editor().apply(model, tokenizer, [request_factory(target_new="Paris")], editor.config_class(layers=[1], lr=1e-2, steps=5))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    edit.revert(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
