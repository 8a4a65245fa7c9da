"""The edit loop and ``edit.py``: modes, outputs, interruption and resume, clear errors."""

from __future__ import annotations

import dataclasses

import json
import statistics

import pytest
import torch

from helpers.runs import as_suite
from factedit.editors import get_editor
from factedit.evaluation.cli import main
from factedit.evaluation.run_dir import read_jsonl
from factedit.evaluation.runner import EditRun
from factedit.evaluation.scoring import EvalConfig

FT = dict(layers=[1], lr=1e-2, steps=5)
EVAL = EvalConfig(batch_size=8, generation_length=4, generation_prompts=1)


def _requests(factory, n=3):
    subjects = [("Danielle Darrieux", "The mother tongue of Danielle Darrieux is"), ("France", "The capital of France is"), ("Angola", "Angola is located in")]
    return [factory(str(i), prompt=p, subject=s, target_new=t) for i, ((s, p), t) in enumerate(zip(subjects[:n], ["Paris", "Rome", "French"]))]


def _run(model, tokenizer, requests, out, mode="single", edits_per_call=1, editor=None, eval_config=EVAL):
    editor = editor or get_editor("ft_m")()
    return EditRun(model, tokenizer, editor, editor.config_class(**FT), requests, out, mode, edits_per_call, eval_config, progress=False).run()


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb")} for r in records]


@pytest.mark.parametrize("mode,per_call", [("single", 1), ("batch", 2), ("sequential", 1), ("sequential", 2)])
def test_modes_write_results_and_leave_model_unchanged(mode, per_call, tiny_model, tokenizer, request_factory, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    summary = _run(tiny_model, tokenizer, _requests(request_factory), tmp_path, mode, per_call)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())
    records = read_jsonl(tmp_path / "cases.jsonl")
    assert [r["case_id"] for r in records] == ["0", "1", "2"]
    assert summary["cases"] == 3 and summary["mode"] == mode
    metrics = summary["metrics"]
    for key in ("reliability", "generalization", "locality", "portability", "es", "ps", "ns", "score", "fluency", "seconds_per_edit", "peak_memory_mb"):
        assert key in metrics, key
        assert summary["protocols"][key] in ("token", "probability", "generation", "efficiency")
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"] == metrics
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if mode == "sequential":
        assert len(list((tmp_path / "edits").iterdir())) == -(-3 // per_call)
        assert all(r["edits_applied"] == 3 for r in records)


class _Interrupting:
    """Wraps an editor and raises KeyboardInterrupt on the n-th call, like a user's Ctrl-C."""

    def __init__(self, inner, fail_on: int) -> None:
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.name, self.config_class, self.supports_batch = inner.name, inner.config_class, inner.supports_batch
        self.computes_together = inner.computes_together

    def prepare(self, *args):
        self.inner.prepare(*args)

    def _call(self) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt

    def apply(self, *args):
        self._call()
        return self.inner.apply(*args)

    def apply_each(self, *args):  # one call for a chunk's edits computed together
        self._call()
        return self.inner.apply_each(*args)


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_a_chunk_left_partly_written_is_measured_whole_again(mode, tokenizer, request_factory, tmp_path, monkeypatch):
    """A run stopped while it wrote a chunk's lines resumes to the uninterrupted run's bits: the
    chunk is measured again in the same company (the batches of an uninterrupted run), and only
    its missing lines are written."""
    from helpers import build_llama
    from factedit.evaluation import measuring

    groups: list[tuple[str, ...]] = []  # the cases of each measuring call
    real = measuring.measure_cases
    monkeypatch.setattr(measuring, "measure_cases", lambda m, t, requests, c, **kw: groups.append(tuple(r.case_id for r in requests)) or real(m, t, requests, c, **kw))
    requests = _requests(request_factory)
    _run(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "fresh", mode)
    fresh = _strip_timing(read_jsonl(tmp_path / "fresh" / "cases.jsonl"))
    together = set(groups)  # the three cases, and in sequential mode the retention at 1 edit ("0",)
    assert ("0", "1", "2") in together
    _run(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "cut", mode)
    path = tmp_path / "cut" / "cases.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])  # killed after the first of three lines
    groups.clear()
    _run(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "cut", mode)
    assert ("0", "1", "2") in groups and set(groups) <= together
    assert _strip_timing(read_jsonl(path)) == fresh


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_interrupted_run_resumes_to_the_same_result(mode, tokenizer, request_factory, tmp_path):
    from helpers import build_llama

    requests = _requests(request_factory)
    # Cases are measured in chunks of two ([0, 1], [2]): an interrupt while case 2 is edited
    # keeps the first chunk; a chunk cut short is measured again whole on resume.
    chunked = dataclasses.replace(EVAL, case_batch=2)
    fresh_model = build_llama(len(tokenizer))
    _run(fresh_model, tokenizer, requests, tmp_path / "fresh", mode, eval_config=chunked)

    model = build_llama(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # single mode computes the first chunk's two edits in one call: the third case's edit is the second call
    interrupting = _Interrupting(get_editor("ft_m")(), fail_on=2 if mode == "single" else 3)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tokenizer, requests, tmp_path / "resumed", mode, editor=interrupting, eval_config=chunked)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "interrupt left the model edited"
    if mode == "single":
        assert len(read_jsonl(tmp_path / "resumed" / "cases.jsonl")) == 2
    else:
        assert len(list((tmp_path / "resumed" / "edits").iterdir())) == 2

    counting = _Interrupting(get_editor("ft_m")(), fail_on=-1)
    _run(model, tokenizer, requests, tmp_path / "resumed", mode, editor=counting, eval_config=chunked)
    assert counting.calls == 1, "finished work was recomputed"
    fresh = _strip_timing(read_jsonl(tmp_path / "fresh" / "cases.jsonl"))
    resumed = _strip_timing(read_jsonl(tmp_path / "resumed" / "cases.jsonl"))
    assert resumed == fresh


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"case_id": "0"}\n{"case_id": "1", "pre": {')
    assert read_jsonl(path) == [{"case_id": "0"}]
    assert path.read_text() == '{"case_id": "0"}\n'


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    from helpers import build_llama

    directory = tmp_path / "tiny-llama"
    build_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def counterfact_file(tmp_path):
    rows = [
        {
            "case_id": i,
            "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new}, "target_true": {"str": true}, "relation_id": "P1"},
            "paraphrase_prompts": [f"Indeed. {prompt.format(subject)}"],
            "neighborhood_prompts": ["The capital of Italy is"],
            "attribute_prompts": [],
            "generation_prompts": [f"{subject} is"],
        }
        for i, (prompt, subject, new, true) in enumerate(
            [("The mother tongue of {} is", "Danielle Darrieux", "English", "French"), ("{} is located in", "Angola", "Antarctica", "Africa")]
        )
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(rows))
    return path


def _cli(model_dir, data, out, *extra):
    args = ["--editor", "ft_m", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--editor.layers", "[1]", "--editor.steps", "3"]
    return main(args + ["--eval.generation_length", "4", "--progress", "false", *extra])


def test_cli_end_to_end(model_dir, counterfact_file, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _cli(model_dir, counterfact_file, out)
    printed = capsys.readouterr().out
    assert "reliability" in printed and "seconds/edit" in printed
    assert summary["cases"] == 2
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["metrics"]) >= {"reliability", "pre_reliability", "es", "pre_es", "score", "fluency", "seconds_per_edit", "peak_memory_mb"}
    config = (out / "config.yaml").read_text()
    assert "steps: 3" in config and "name: ft_m" in config
    # Same command again: resumes, recomputes nothing, same summary.
    again = _cli(model_dir, counterfact_file, out)
    assert again["metrics"] == summary["metrics"]
    # Different settings into the same folder: refused with the differing key named.
    with pytest.raises(SystemExit, match="editor"):
        _cli(model_dir, counterfact_file, out, "--editor.lr", "0.1")
    # A larger --limit extends a single-mode run; in sequential mode it would change what was measured.
    assert _cli(model_dir, counterfact_file, out, "--limit", "1")["cases"] == 1
    _cli(model_dir, counterfact_file, tmp_path / "seq", "--mode", "sequential", "--limit", "1")
    with pytest.raises(SystemExit, match="limit"):
        _cli(model_dir, counterfact_file, tmp_path / "seq", "--mode", "sequential", "--limit", "2")


def test_cli_reports_bad_records_with_file_index_and_field(model_dir, counterfact_file, tmp_path):
    rows = json.loads(counterfact_file.read_text())
    rows[1]["requested_rewrite"]["target_new"]["str"] = ""
    counterfact_file.write_text(json.dumps(rows))
    with pytest.raises(SystemExit) as err:
        _cli(model_dir, counterfact_file, tmp_path / "bad")
    message = str(err.value)
    assert "cf.json" in message and "record 1" in message and "target_new" in message
    summary = _cli(model_dir, counterfact_file, tmp_path / "skipping", "--skip-invalid")
    assert summary["cases"] == 1
    assert len(summary["skipped_records"]) == 1 and "target_new" in summary["skipped_records"][0]
    assert json.loads((tmp_path / "skipping" / "summary.json").read_text())["skipped_records"] == summary["skipped_records"]


def test_cli_unknown_editor_and_missing_model(model_dir, counterfact_file, tmp_path):
    with pytest.raises(SystemExit, match="unknown editor 'nope'"):
        main(["--editor", "nope"])
    with pytest.raises(SystemExit, match="config.json"):
        _cli(tmp_path, counterfact_file, tmp_path / "x")


def test_sequential_resume_prepares_on_the_unedited_model(tokenizer, request_factory, tmp_path, isolated_cache):
    """Key statistics and prefixes of a resumed sequential run come from the unedited model, not
    from the model carrying the re-applied edits."""
    from helpers import build_llama

    requests = [request_factory(str(i), prompt="The mother tongue is Danielle Darrieux", target_new=t) for i, t in enumerate(["Paris", "Rome", "English"])]
    config = get_editor("rome").config_class(layer=1, v_steps=3, context_count=1, stats_samples=4, stats_max_length=8)

    def run(model, editor):
        return EditRun(model, tokenizer, editor, config, requests, tmp_path / "seq", mode="sequential", eval_config=EvalConfig(fluency=False), progress=False).run()

    model = build_llama(len(tokenizer))
    fingerprint = __import__("factedit.models", fromlist=["model_fingerprint"]).model_fingerprint(model)
    with pytest.raises(KeyboardInterrupt):
        run(model, _Interrupting(get_editor("rome")(), fail_on=3))
    resumed = get_editor("rome")()
    summary = run(model, resumed)
    assert summary["cases"] == 3 and "prepare_seconds" in summary
    assert list(resumed._fingerprints.values()) == [fingerprint]


# -- sequential checkpoints, the general suite, groups ---------------------------------------


def _weights_probe(model, tokenizer, config):
    """A stand-in for the general suite: a number that moves when the weights move."""
    total = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    return {"probe": {"acc": total, "steps": float(len(config.tasks))}}


def test_edit_units_keep_groups_whole(request_factory):
    from factedit.evaluation.cases import edit_units

    def req(i, group=None):
        r = request_factory(str(i))
        object.__setattr__(r, "group", group) if hasattr(r, "group") else None
        return r

    requests = [req(0), req(1, "g"), req(2, "g"), req(3, "g"), req(4), req(5)]
    if not hasattr(requests[0], "group"):
        pytest.skip("EditRequest has no group field")
    ids = lambda units: [[r.case_id for r in u] for u in units]
    assert ids(edit_units(requests, 1)) == [["0"], ["1", "2", "3"], ["4"], ["5"]]
    assert ids(edit_units(requests, 2)) == [["0"], ["1", "2", "3"], ["4", "5"]]
    assert ids(edit_units(requests, 4)) == [["0", "1", "2", "3"], ["4", "5"]]


def test_checkpoint_schedule():
    from factedit.evaluation.cases import checkpoint_schedule

    assert checkpoint_schedule(200) == [1, 5, 10, 20, 50, 100, 200]
    assert checkpoint_schedule(7, [10, 2, 5]) == [2, 5, 7]
    with pytest.raises(ValueError, match="checkpoints"):
        checkpoint_schedule(5, [0, 2])


def _general(tasks=("piqa",)):
    from factedit.evaluation.general import GeneralConfig

    return GeneralConfig(tasks=list(tasks))


def _seq(model, tokenizer, requests, out, editor=None, **kwargs):
    editor = editor or get_editor("ft_m")()
    return EditRun(model, tokenizer, editor, editor.config_class(**FT), requests, out, "sequential", 1, EvalConfig(batch_size=8, fluency=False), progress=False, **kwargs).run()


def test_sequential_checkpoints_score_retention_and_general(tokenizer, request_factory, tmp_path, monkeypatch, isolated_cache):
    from helpers import build_llama

    from factedit.evaluation import general as evaluation_general
    monkeypatch.setattr(evaluation_general, "run_general", as_suite(_weights_probe))
    model = build_llama(len(tokenizer))
    unedited = _weights_probe(model, tokenizer, _general())["probe"]["acc"]
    summary = _seq(model, tokenizer, _requests(request_factory), tmp_path, checkpoints=[1, 2], general=_general())
    lines = read_jsonl(tmp_path / "checkpoints.jsonl")
    assert [c["edits"] for c in lines] == [0, 1, 2, 3] and summary["checkpoints"] == [0, 1, 2, 3]
    assert lines[0]["general"]["probe"]["acc"] == unedited and lines[0]["retention"] == {}
    assert all(c["general"]["probe"]["acc"] != unedited for c in lines[1:])  # scored on the edited model
    # Retention at the last checkpoint is the run's post-edit summary; earlier ones cover the edits so far.
    assert lines[-1]["retention"]["reliability"] == summary["metrics"]["reliability"]
    records = read_jsonl(tmp_path / "cases.jsonl")
    assert lines[-1]["retention"]["es"] == pytest.approx(sum(r["post"]["scores"]["es"] for r in records) / 3)
    # each retention score's standard error over the cases scored, for the error bars of the curves
    reliability = [r["post"]["scores"]["reliability"] for r in records]
    assert lines[-1]["retention_n"]["reliability"] == 3 and lines[1]["retention_n"]["reliability"] == 1
    assert lines[-1]["retention_stderr"]["reliability"] == pytest.approx(statistics.stdev(reliability) / 3**0.5)
    assert "reliability" not in lines[1]["retention_stderr"]  # one case: no standard error
    assert 0 <= lines[1]["retention"]["reliability"] <= 1 and lines[1]["edit_seconds"] <= lines[2]["edit_seconds"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Edit budget" in (tmp_path / "checkpoints.md").read_text()
    assert summary["edit_budget"]["max_edits"] == 3
    assert _weights_probe(model, tokenizer, _general())["probe"]["acc"] == unedited  # reverted
    # edit.py compare reads the run back: plot, tables and the same budget.
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert json.loads((tmp_path / "cmp" / "budget.json").read_text())["ft_m"]["max_edits"] == 3


def test_sequential_checkpoints_resume_without_repeating(tokenizer, request_factory, tmp_path, monkeypatch, isolated_cache):
    from helpers import build_llama

    from factedit.evaluation import general as evaluation_general
    calls = []

    def probe(model, tokenizer, config):
        calls.append(1)
        return _weights_probe(model, tokenizer, config)

    monkeypatch.setattr(evaluation_general, "run_general", as_suite(probe))
    requests = _requests(request_factory)
    _seq(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "fresh", checkpoints=[1, 2], general=_general())
    fresh = read_jsonl(tmp_path / "fresh" / "checkpoints.jsonl")
    calls.clear()
    model = build_llama(len(tokenizer))
    with pytest.raises(KeyboardInterrupt):
        _seq(model, tokenizer, requests, tmp_path / "cut", editor=_Interrupting(get_editor("ft_m")(), fail_on=3), checkpoints=[1, 2], general=_general())
    assert [c["edits"] for c in read_jsonl(tmp_path / "cut" / "checkpoints.jsonl")] == [0, 1, 2]
    _seq(model, tokenizer, requests, tmp_path / "cut", checkpoints=[1, 2], general=_general())
    resumed = read_jsonl(tmp_path / "cut" / "checkpoints.jsonl")
    # The unedited model's scores were computed once, by the first run, and shared.
    assert [c["edits"] for c in resumed] == [0, 1, 2, 3] and len(calls) == 3
    assert resumed[0].get("general_cached") and not fresh[0].get("general_cached")
    assert [c["general"] for c in resumed] == [c["general"] for c in fresh]
    assert [c["retention"] for c in resumed] == [c["retention"] for c in fresh]


def test_batch_mode_scores_general_after_first_call_and_single_refuses(tokenizer, request_factory, tmp_path, monkeypatch, isolated_cache):
    from helpers import build_llama

    from factedit.evaluation import general as evaluation_general
    monkeypatch.setattr(evaluation_general, "run_general", as_suite(_weights_probe))
    model = build_llama(len(tokenizer))
    editor = get_editor("ft_m")()
    run = EditRun(model, tokenizer, editor, editor.config_class(**FT), _requests(request_factory), tmp_path, "batch", 2, EvalConfig(batch_size=8, fluency=False), progress=False, general=_general())
    summary = run.run()
    lines = read_jsonl(tmp_path / "checkpoints.jsonl")
    assert [c["edits"] for c in lines] == [0, 2] and lines[1]["general"] != lines[0]["general"]
    assert summary["cases"] == 3
    with pytest.raises(ValueError, match="general-ability suite needs"):
        EditRun(model, tokenizer, editor, editor.config_class(**FT), _requests(request_factory), tmp_path / "s", "single", general=_general())


def test_group_is_edited_together_by_an_editor_that_cannot_batch(tokenizer, request_factory, tmp_path, isolated_cache):
    """A multi-hop case's rewrites are all applied before it is scored, also by ROME (one
    request per call), and all reverted afterwards."""
    from helpers import build_llama

    requests = [request_factory(str(i), prompt=f"The mother tongue of Danielle Darrieux is {w}", target_new=t) for i, (w, t) in enumerate([("a", "Paris"), ("b", "Rome")])]
    if not hasattr(requests[0], "group"):
        pytest.skip("EditRequest has no group field")
    for r in requests:
        object.__setattr__(r, "group", "case")
    model = build_llama(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = get_editor("rome")()
    config = editor.config_class(layer=1, v_steps=3, context_count=1, stats_samples=4, stats_max_length=8)
    calls = []
    original = editor.apply
    editor.apply = lambda *a: calls.append(len(a[2])) or original(*a)
    EditRun(model, tokenizer, editor, config, requests, tmp_path, "single", eval_config=EvalConfig(batch_size=8, fluency=False), progress=False).run()
    assert calls == [1, 1]
    records = read_jsonl(tmp_path / "cases.jsonl")
    assert [r["edits_per_call"] for r in records] == [2, 2]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_half_written_edit_folder_is_ignored_on_resume(tokenizer, request_factory, tmp_path):
    """Edits are saved beside their folder and renamed into place: a folder left by an
    interruption during the save is not re-applied (nor does it stop the resume)."""
    from helpers import build_llama

    model = build_llama(len(tokenizer))
    requests = _requests(request_factory)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tokenizer, requests, tmp_path, "sequential", editor=_Interrupting(get_editor("ft_m")(), fail_on=3))
    assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == ["000001", "000002"]
    stray = tmp_path / "edits" / ".000003.partial"
    stray.mkdir()
    (stray / "edit.safetensors").write_bytes(b"torn")
    summary = _run(model, tokenizer, requests, tmp_path, "sequential")
    assert summary["cases"] == 3
    assert sorted(p.name for p in (tmp_path / "edits").iterdir() if not p.name.startswith(".")) == ["000001", "000002", "000003"]


# -- provenance, decoded predictions, interruption, live TensorBoard -------------------------


def _events(folder):
    """The TensorBoard events written under ``folder`` so far."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def _steps(folder, tag):
    return [event.step for event in _events(folder).Scalars(tag)]


class _Bar:
    """Stands in for tqdm: remembers how each progress bar was made and the stages it showed."""

    made: list["_Bar"] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.stages = kwargs, []
        _Bar.made.append(self)

    def update(self, n=1) -> None:
        pass

    def set_postfix_str(self, text) -> None:
        self.stages.append(text)

    def close(self) -> None:
        pass


def test_summary_records_provenance(model_dir, counterfact_file, tmp_path):
    import datetime
    import hashlib

    from factedit.models import model_fingerprint
    from factedit.models import load_model

    summary = _cli(model_dir, counterfact_file, tmp_path / "run")
    provenance = json.loads((tmp_path / "run" / "summary.json").read_text())["provenance"]
    assert provenance == summary["provenance"]
    assert set(provenance) == {"model", "model_fingerprint", "data", "data_file", "data_sha256", "versions", "git_commit", "git_dirty", "date"}
    assert provenance["model"] == str(model_dir) and provenance["data"] == str(counterfact_file)
    assert provenance["data_file"] == str(counterfact_file.resolve())
    assert provenance["data_sha256"] == hashlib.sha256(counterfact_file.read_bytes()).hexdigest()
    assert provenance["model_fingerprint"] == model_fingerprint(load_model(str(model_dir), device="cpu")[0])
    assert set(provenance["versions"]) == {"python", "torch", "transformers", "factedit", "lightning", "torchmetrics", "datasets"}
    assert provenance["git_commit"] is None or len(provenance["git_commit"]) == 40
    assert datetime.datetime.fromisoformat(provenance["date"]).utcoffset() == datetime.timedelta(0)


def test_cases_keep_decoded_predictions_and_saved_edits_their_provenance(tokenizer, request_factory, tmp_path):
    from helpers import build_llama

    from factedit.evaluation.scoring import TOKEN_GROUPS

    requests = _requests(request_factory, 2)
    editor = get_editor("ft_m")()
    run = EditRun(build_llama(len(tokenizer)), tokenizer, editor, editor.config_class(**FT), requests, tmp_path, "sequential", 1, EVAL, progress=False, model_id="tiny-llama")
    summary = run.run()
    items = [item for r in read_jsonl(tmp_path / "cases.jsonl") for stage in ("pre", "post") for group in TOKEN_GROUPS for item in r[stage]["raw"][group]]
    assert items and all(item["pred_text"] == tokenizer.decode(item["pred"]) for item in items)
    assert summary["provenance"]["model"] == "tiny-llama" and summary["provenance"]["data"] is None
    for number, request in enumerate(requests, start=1):
        meta = json.loads((tmp_path / "edits" / f"{number:06d}" / "edit.json").read_text())
        texts = {"case_id": request.case_id, "prompt": request.prompt, "subject": request.subject, "target_new": request.target_new, "target_true": request.target_true}
        assert meta["requests"] == [texts]
        assert meta["model"]["name"] == "tiny-llama"
        made = meta["provenance"]
        assert made["model"] == "tiny-llama" and made["model_fingerprint"] == summary["provenance"]["model_fingerprint"]
        assert made["versions"] == summary["provenance"]["versions"] and made["git_commit"] == summary["provenance"]["git_commit"]
        assert "date" in made


def test_tensorboard_shows_each_case_as_it_finishes(tokenizer, request_factory, tmp_path, monkeypatch):
    from helpers import build_llama
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from factedit.evaluation.board import RunBoard

    seen = []
    add = RunBoard.add

    def add_and_look(board, record):
        add(board, record)
        seen.append(_steps(tmp_path / "tensorboard", "summary/reliability"))

    monkeypatch.setattr(RunBoard, "add", add_and_look)
    summary = _run(build_llama(len(tokenizer)), tokenizer, _requests(request_factory), tmp_path)
    assert seen == [[1], [1, 2], [1, 2, 3]]  # on disk while the run goes
    assert _steps(tmp_path / "tensorboard", "case_post/reliability") == [0, 1, 2]
    events = _events(tmp_path / "tensorboard")
    assert events.Scalars("summary/reliability")[-1].value == pytest.approx(summary["metrics"]["reliability"])
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["editor"].string_value == "ft_m" and start.hparams["editor.steps"].number_value == FT["steps"]


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(model_dir, counterfact_file, tmp_path, capsys, monkeypatch):
    from factedit.evaluation import runner as evaluation_runner
    editor_class = get_editor("ft_m")
    apply = editor_class.apply
    calls = []

    def interrupted_on_the_second_case(self, model, tokenizer, requests, config):
        calls.append(requests[0].case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return apply(self, model, tokenizer, requests, config)

    monkeypatch.setattr(editor_class, "apply", interrupted_on_the_second_case)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:  # each case measured alone: an interrupt loses no finished case
        _cli(model_dir, counterfact_file, out, "--eval.case_batch", "1")
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "edit.py: interrupted after 1 of 2 cases; rerun the same command to resume" in err and "Traceback" not in err
    assert [r["case_id"] for r in read_jsonl(out / "cases.jsonl")] == ["0"]
    assert _steps(out / "tensorboard", "summary/reliability") == [1]  # the finished case is on TensorBoard already

    monkeypatch.setattr(editor_class, "apply", apply)
    monkeypatch.setattr(evaluation_runner, "tqdm", _Bar)
    _Bar.made.clear()
    summary = _cli(model_dir, counterfact_file, out, "--progress", "true", "--eval.case_batch", "1")
    assert summary["cases"] == 2 and summary["failed_cases"] == 0
    assert [r["case_id"] for r in read_jsonl(out / "cases.jsonl")] == ["0", "1"]
    (bar,) = _Bar.made
    assert (bar.kwargs["initial"], bar.kwargs["total"]) == (1, 2)  # 1/2, not 0/1
    assert bar.stages[:2] == ["pre-scoring", "pre-scoring: fluency"] and "editing" in bar.stages and "post-scoring: generation" in bar.stages
    assert _steps(out / "tensorboard", "summary/reliability") == [1, 2]


def test_checkpoints_keep_item_scores_for_the_budget(tokenizer, request_factory, tmp_path, monkeypatch, isolated_cache):
    """Each checkpoint keeps the suite's item scores and chance levels; the unedited model's come
    back from the shared cache with its scores, so a second run's budget is tested the same way."""
    from helpers import build_llama

    from factedit.evaluation import general as evaluation_general
    from factedit.evaluation.general import GeneralRun

    def suite(model, tokenizer, config):
        acc = _weights_probe(model, tokenizer, config)["probe"]["acc"]
        return GeneralRun(scores={"probe": {"acc": acc}}, items={}, costs={}, seconds=0.0, item_scores={"probe": [1.0] * 5}, chance={"probe": 0.25})

    monkeypatch.setattr(evaluation_general, "run_general", suite)
    requests = _requests(request_factory)
    for out in ("first", "second"):
        summary = _seq(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / out, checkpoints=[1], general=_general())
        lines = read_jsonl(tmp_path / out / "checkpoints.jsonl")
        assert all(line["general_item_scores"] == {"probe": [1.0] * 5} and line["general_chance"] == {"probe": 0.25} for line in lines)
        assert summary["edit_budget"]["tested"] == ["probe"] and summary["edit_budget"]["budget"] is None  # no item changed
    assert lines[0].get("general_cached")


def test_immediate_sequential_scoring_scores_each_case_after_its_own_edit(tokenizer, request_factory, tmp_path, isolated_cache):
    """``sequential_scoring="immediate"``: case k is scored on the model with edits 0..k (case 0
    as a single edit would be, the last case as in the final-model protocol); the last
    checkpoint still scores every case on the model carrying all edits."""
    from helpers import build_llama

    requests = _requests(request_factory)
    # Each case measured alone, as the immediate protocol measures it (batched with other cases,
    # its numbers would differ in the last bits of the float rounding).
    _run(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "single", eval_config=dataclasses.replace(EVAL, case_batch=1))
    single = {r["case_id"]: r for r in read_jsonl(tmp_path / "single" / "cases.jsonl")}
    final = _seq(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "final", checkpoints=[1])
    immediate = _seq(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "immediate", checkpoints=[1], sequential_scoring="immediate")
    now = {r["case_id"]: r for r in read_jsonl(tmp_path / "immediate" / "cases.jsonl")}
    last = {r["case_id"]: r for r in read_jsonl(tmp_path / "final" / "cases.jsonl")}
    assert [now[c]["edits_applied"] for c in "012"] == [1, 2, 3]
    def without_fluency(post):  # the single-mode helper also samples for fluency
        return {part: {k: v for k, v in post[part].items() if k != "fluency"} for part in ("raw", "scores")}

    assert without_fluency(now["0"]["post"]) == without_fluency(single["0"]["post"])  # one edit applied, as in single mode
    assert now["2"]["post"] == last["2"]["post"]  # all three applied, as in the final protocol
    assert now["0"]["post"] != last["0"]["post"]  # later edits moved case 0's scores in the final protocol
    assert immediate["sequential_scoring"] == "immediate" and final["sequential_scoring"] == "final"
    checkpoints = {line["edits"]: line for line in read_jsonl(tmp_path / "immediate" / "checkpoints.jsonl")}
    assert checkpoints[3]["retention"] == read_jsonl(tmp_path / "final" / "checkpoints.jsonl")[-1]["retention"]
    with pytest.raises(ValueError, match="sequential_scoring"):
        _seq(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "bad", sequential_scoring="later")


def test_immediate_scoring_resumes_where_it_stopped(tokenizer, request_factory, tmp_path, isolated_cache):
    from helpers import build_llama

    requests = _requests(request_factory)
    _seq(build_llama(len(tokenizer)), tokenizer, requests, tmp_path / "fresh", checkpoints=[1], sequential_scoring="immediate")
    model = build_llama(len(tokenizer))
    with pytest.raises(KeyboardInterrupt):
        _seq(model, tokenizer, requests, tmp_path / "cut", editor=_Interrupting(get_editor("ft_m")(), fail_on=3), checkpoints=[1], sequential_scoring="immediate")
    assert [r["case_id"] for r in read_jsonl(tmp_path / "cut" / "cases.jsonl")] == ["0", "1"]  # scored as they were edited
    _seq(model, tokenizer, requests, tmp_path / "cut", checkpoints=[1], sequential_scoring="immediate")
    assert _strip_timing(read_jsonl(tmp_path / "cut" / "cases.jsonl")) == _strip_timing(read_jsonl(tmp_path / "fresh" / "cases.jsonl"))
    retention = [c["retention"] for c in read_jsonl(tmp_path / "cut" / "checkpoints.jsonl")]
    assert retention == [c["retention"] for c in read_jsonl(tmp_path / "fresh" / "checkpoints.jsonl")]


def test_immediate_scoring_scores_a_saved_but_unscored_edit_on_replay(tokenizer, request_factory, tmp_path, isolated_cache):
    """Stopped between saving an edit and scoring its case: the resumed run scores the case right
    after re-applying that edit, before the edits that follow it."""
    from helpers import build_llama

    requests = _requests(request_factory)
    out = tmp_path / "run"
    _seq(build_llama(len(tokenizer)), tokenizer, requests, out, checkpoints=[1], sequential_scoring="immediate")
    fresh = _strip_timing(read_jsonl(out / "cases.jsonl"))
    lines = (out / "cases.jsonl").read_text().splitlines(keepends=True)
    (out / "cases.jsonl").write_text(lines[0] + lines[2])  # case 1 lost; edits 0-2 stay saved
    (out / "checkpoints.jsonl").write_text((out / "checkpoints.jsonl").read_text().splitlines(keepends=True)[0])
    _seq(build_llama(len(tokenizer)), tokenizer, requests, out, checkpoints=[1], sequential_scoring="immediate")
    again = {r["case_id"]: r for r in _strip_timing(read_jsonl(out / "cases.jsonl"))}
    assert again["1"] == fresh[1] and again["1"]["edits_applied"] == 2


def test_reference_join_always_adds_a_space(tokenizer, request_factory, tmp_path, isolated_cache):
    """``EvalConfig(join="reference")``: prompt + " " + target as EasyEdit and ROME write it, also
    for a target that starts with a space; the rule holds during the run only."""
    from helpers import build_llama

    from factedit.editors.core.lm import encode_pair, join_text

    request = request_factory("0", target_new=" Paris")
    assert join_text("The capital is", " Paris") == ("The capital is", " Paris")
    records = {}
    for join in ("smart", "reference"):
        editor = get_editor("ft_m")()
        EditRun(build_llama(len(tokenizer)), tokenizer, editor, editor.config_class(**FT), [request], tmp_path / join, "single", 1,
                EvalConfig(batch_size=8, fluency=False, generation_scoring=False, join=join), progress=False).run()
        records[join] = read_jsonl(tmp_path / join / "cases.jsonl")[0]
    targets = {join: records[join]["pre"]["raw"]["reliability"][0]["target"] for join in records}
    assert targets["smart"] == encode_pair(tokenizer, request.prompt, " Paris")[1]
    assert targets["reference"] == tokenizer("  Paris", add_special_tokens=False)["input_ids"] != targets["smart"]
    assert join_text("The capital is", " Paris") == ("The capital is", " Paris")  # back to the default
    with pytest.raises(ValueError, match="join"):
        EvalConfig(join="always")
