"""A case that fails is recorded and the run goes on: over-long prompts, refused edits, errors
after editing; the model is left as found; a resumed run does not retry the failure."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch

import factedit.evaluation.measuring as measuring
import factedit.evaluation.runner as runner
from factedit.editors import get_editor
from factedit.editors.base import Edit, ParamDelta
from factedit.evaluation.cli import main
from factedit.evaluation.report import summary_table
from factedit.evaluation.run_dir import read_jsonl
from factedit.evaluation.runner import EditRun
from factedit.evaluation.scoring import EvalConfig, RunMetrics

FT = dict(layers=[1], lr=1e-2, steps=3)
EVAL = EvalConfig(batch_size=8, fluency=False, generation_max_new_tokens=2)
LONG_PROMPT = "Xq zv " * 80 + "The capital of France is"  # ~480 tokens: more than the 128 positions of the tiny GPT-2


def _requests(factory, middle_prompt=None):
    cases = [("Danielle Darrieux", "The mother tongue of Danielle Darrieux is"), ("France", middle_prompt or "The capital of France is"), ("Angola", "Angola is located in")]
    return [factory(str(i), prompt=p, subject=s, target_new=t) for i, ((s, p), t) in enumerate(zip(cases, ["Paris", "Rome", "French"]))]


class _Wrapped:
    """An editor that behaves like ``inner`` except for what ``on_apply`` does first; counts calls."""

    def __init__(self, inner, on_apply=None) -> None:
        self.inner, self.on_apply, self.calls = inner, on_apply, 0
        self.name, self.config_class, self.supports_batch = inner.name, inner.config_class, inner.supports_batch

    def prepare(self, *args):
        self.inner.prepare(*args)

    def apply(self, model, tokenizer, requests, config):
        self.calls += 1
        if self.on_apply is not None:
            edit = self.on_apply(model, requests)
            if edit is not None:
                return edit
        return self.inner.apply(model, tokenizer, requests, config)


def _run(model, tokenizer, requests, out, mode="single", per_call=1, editor=None, eval_config=EVAL):
    editor = editor or _Wrapped(get_editor("ft_m")())
    return EditRun(model, tokenizer, editor, editor.config_class(**FT), requests, out, mode, per_call, eval_config, progress=False).run()


def _gpt2(tokenizer):
    from helpers import build_gpt2

    return build_gpt2(len(tokenizer))  # n_positions=128


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _quality(metrics):
    return {k: v for k, v in metrics.items() if "seconds" not in k and "memory" not in k}


def _scores(records):
    return [{k: r[k] for k in ("case_id", "pre", "post")} for r in records]


def _assert_close(got, expected, path="") -> None:
    """Equal structure, equal ids and texts, floats equal up to the rounding of a differently shaped
    batch (a chunk that holds a failed case falls back to measuring its cases one at a time)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected:
            _assert_close(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_close(a, b, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), path
    else:
        assert got == expected, path


@pytest.mark.parametrize("mode,per_call", [("single", 1), ("batch", 2), ("sequential", 1)])
def test_overlong_prompt_is_recorded_as_failed_and_the_run_goes_on(mode, per_call, tokenizer, request_factory, tmp_path):
    model = _gpt2(tokenizer)
    before = _params(model)
    summary = _run(model, tokenizer, _requests(request_factory, LONG_PROMPT), tmp_path / "run", mode, per_call)
    assert _unchanged(model, before)
    records = read_jsonl(tmp_path / "run" / "cases.jsonl")
    assert sorted(r["case_id"] for r in records) == ["0", "1", "2"]
    failed = [r for r in records if "failed" in r]
    assert [r["case_id"] for r in failed] == ["1"] and "pre" not in failed[0]
    assert failed[0]["failed"]["stage"] == "pre" and failed[0]["failed"]["error"] == "IndexError" and failed[0]["failed"]["message"]
    assert summary["cases"] == 3 and summary["failed_cases"] == 1 and summary["failed_case_ids"] == ["1"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["failed_case_ids"] == ["1"]
    if mode != "batch":  # the metrics are those of the other cases alone (the failed case was never edited)
        good = [r for r in _requests(request_factory) if r.case_id != "1"]
        alone = _run(_gpt2(tokenizer), tokenizer, good, tmp_path / "alone", mode, per_call)
        _assert_close(_quality(summary["metrics"]), _quality(alone["metrics"]))
        _assert_close(_scores([r for r in records if "failed" not in r]), _scores(read_jsonl(tmp_path / "alone" / "cases.jsonl")))
    # The same command again: the recorded failure is finished work, not retried.
    again = _Wrapped(get_editor("ft_m")())
    assert _run(model, tokenizer, _requests(request_factory, LONG_PROMPT), tmp_path / "run", mode, per_call, editor=again)["failed_cases"] == 1
    assert again.calls == 0 and len(read_jsonl(tmp_path / "run" / "cases.jsonl")) == 3
    table = summary_table(summary)
    assert "1 of them FAILED" in table and "case ids: 1" in table


def _nan_edit_for(case_id):
    """A refused edit (non-finite delta) for ``case_id``, like float16 overflow."""

    def on_apply(model, requests):
        if any(r.case_id == case_id for r in requests):
            name, param = next(iter(model.named_parameters()))
            return Edit("ft_m", {name: ParamDelta(delta=torch.full_like(param, float("nan")))}, [r.case_id for r in requests], {}, {}).apply(model)
        return None

    return on_apply


@pytest.mark.parametrize("mode,per_call,refused", [("single", 1, ["1"]), ("batch", 2, ["0", "1"]), ("sequential", 1, ["1"])])
def test_refused_edit_is_recorded_and_the_other_edits_go_on(mode, per_call, refused, tokenizer, request_factory, tmp_path):
    from helpers import build_llama

    model = build_llama(len(tokenizer))
    before = _params(model)
    editor = _Wrapped(get_editor("ft_m")(), _nan_edit_for("1"))
    summary = _run(model, tokenizer, _requests(request_factory), tmp_path, mode, per_call, editor=editor)
    assert _unchanged(model, before)
    records = {r["case_id"]: r for r in read_jsonl(tmp_path / "cases.jsonl")}
    assert set(records) == {"0", "1", "2"}
    for case_id in refused:  # in batch mode the whole call is refused
        assert records[case_id]["failed"]["stage"] == "edit" and records[case_id]["failed"]["error"] == "EditError"
        assert "non-finite" in records[case_id]["failed"]["message"]
    assert "failed" not in records["2"] and summary["failed_case_ids"] == refused
    if mode == "sequential":  # the run went on without the refused edit; the other two stay applied
        assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == ["000001", "000002"]
        assert records["0"]["edits_applied"] == records["2"]["edits_applied"] == 2
        assert read_jsonl(tmp_path / "checkpoints.jsonl")[-1]["edits"] == 2


def test_compare_reads_a_sequential_run_with_failed_cases(tokenizer, request_factory, tmp_path, monkeypatch, isolated_cache):
    from helpers import build_llama

    from factedit.evaluation import general as evaluation_general
    from factedit.evaluation.general import GeneralConfig
    from helpers.runs import as_suite

    def probe(model, tokenizer, config):  # a stand-in for the general suite that moves with the weights
        return {"probe": {"acc": sum(float(p.detach().double().abs().sum()) for p in model.parameters())}}

    monkeypatch.setattr(evaluation_general, "run_general", as_suite(probe))
    editor = _Wrapped(get_editor("ft_m")(), _nan_edit_for("1"))
    run = EditRun(build_llama(len(tokenizer)), tokenizer, editor, editor.config_class(**FT), _requests(request_factory), tmp_path, "sequential", 1, EVAL,
                  progress=False, checkpoints=[1, 2], general=GeneralConfig(tasks=["piqa"]))
    summary = run.run()
    assert summary["failed_case_ids"] == ["1"] and summary["checkpoints"] == [0, 1, 2]
    assert read_jsonl(tmp_path / "checkpoints.jsonl")[-1]["retention"]["es"] == summary["metrics"]["es"]
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp" / "budget.json").read_text())["ft_m"]["max_edits"] == 2


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_error_after_editing_is_recorded_and_the_model_reverted(mode, tokenizer, request_factory, tmp_path, monkeypatch):
    from helpers import build_llama

    measured: list[str] = []
    real = measuring.measure_cases

    def failing_post(model, tokenizer, requests, config, **kwargs):
        measured.extend(r.case_id for r in requests)
        if "0" in [r.case_id for r in requests] and measured.count("0") >= 2:  # case 0 on the edited model
            raise RuntimeError("probe broke")
        return real(model, tokenizer, requests, config, **kwargs)

    monkeypatch.setattr(measuring, "measure_cases", failing_post)
    model = build_llama(len(tokenizer))
    before = _params(model)
    summary = _run(model, tokenizer, _requests(request_factory), tmp_path, mode)
    assert _unchanged(model, before)
    records = {r["case_id"]: r for r in read_jsonl(tmp_path / "cases.jsonl")}
    assert records["0"]["failed"] == {"stage": "post", "error": "RuntimeError", "message": "probe broke"}
    assert "failed" not in records["1"] and "failed" not in records["2"]
    assert summary["failed_case_ids"] == ["0"]


def test_failed_lines_are_skipped_by_run_metrics(tokenizer, request_factory, tmp_path):
    _run(_gpt2(tokenizer), tokenizer, _requests(request_factory, LONG_PROMPT), tmp_path, "single")
    records = read_jsonl(tmp_path / "cases.jsonl")
    metrics = RunMetrics()
    for record in records:
        metrics.update(record)
    assert metrics.cases == 2


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_memory_errors_and_interrupts_still_stop_the_run(error, tokenizer, request_factory, tmp_path):
    from helpers import build_llama

    def raise_error(model, requests):
        raise error()

    model = build_llama(len(tokenizer))
    before = _params(model)
    with pytest.raises(error):
        _run(model, tokenizer, _requests(request_factory), tmp_path, "single", editor=_Wrapped(get_editor("ft_m")(), raise_error))
    assert _unchanged(model, before)
    assert read_jsonl(tmp_path / "cases.jsonl") == []


def test_a_group_fails_whole_when_one_rewrite_fails(tokenizer, request_factory, tmp_path, monkeypatch):
    """The rewrites of a multi-hop case are edited together or not at all."""
    from helpers import build_llama

    requests = _requests(request_factory)
    for request in requests[:2]:
        object.__setattr__(request, "group", "hop")
    real = measuring.measure_cases

    def failing_pre(model, tokenizer, requests, config, **kwargs):
        if "1" in [r.case_id for r in requests]:
            raise ValueError("bad probe")
        return real(model, tokenizer, requests, config, **kwargs)

    monkeypatch.setattr(measuring, "measure_cases", failing_pre)
    editor = _Wrapped(get_editor("ft_m")())
    summary = _run(build_llama(len(tokenizer)), tokenizer, requests, tmp_path, "single", editor=editor)
    records = {r["case_id"]: r for r in read_jsonl(tmp_path / "cases.jsonl")}
    assert records["1"]["failed"] == {"stage": "pre", "error": "ValueError", "message": "bad probe"}
    assert records["0"]["failed"]["stage"] == "pre" and "case 1 of its group 'hop' failed: bad probe" in records["0"]["failed"]["message"]
    assert "failed" not in records["2"] and editor.calls == 1 and summary["failed_case_ids"] == ["0", "1"]


def test_fine_tuning_that_fails_midway_leaves_the_weights_as_found(tiny_model, tokenizer, request_factory, monkeypatch):
    import factedit.editors.ft.editor as ft

    def broken(model, batch, optimizer, *args):
        optimizer.param_groups[0]["params"][0].data.add_(1.0)  # a training step happened
        raise RuntimeError("diverged")

    monkeypatch.setattr(ft, "minimise_target_nll", broken)
    before = _params(tiny_model)
    with pytest.raises(RuntimeError, match="diverged"):
        get_editor("ft_m")().apply(tiny_model, tokenizer, [request_factory()], get_editor("ft_m").config_class(**FT))
    assert _unchanged(tiny_model, before)


@pytest.mark.parametrize("case_batch", [1, 16])
@pytest.mark.parametrize("damage", ["weights", "hook"])
def test_an_editor_that_fails_and_leaves_the_model_changed_stops_the_run(damage, case_batch, tiny_model, tokenizer, request_factory, tmp_path):
    def fail_second(model, requests):
        if requests[0].case_id != "1":
            return None
        if damage == "weights":
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        else:
            model.register_forward_hook(lambda *args: None)
        raise RuntimeError("broke halfway")

    with pytest.raises(runner.ModelLeftChangedError, match="case 1 .*broke halfway"):
        _run(
            tiny_model, tokenizer, _requests(request_factory), tmp_path / "run", editor=_Wrapped(get_editor("ft_m")(), fail_second),
            eval_config=dataclasses.replace(EVAL, case_batch=case_batch),
        )
    # A finished case is kept; case 0 is finished once its chunk is: alone, or measured after
    # editing with the chunk's other cases (which a damaged model cannot be).
    assert [r["case_id"] for r in read_jsonl(tmp_path / "run" / "cases.jsonl")] == (["0"] if case_batch == 1 else [])
