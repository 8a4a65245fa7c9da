"""The run folder of ``edit.py``: its lock against a second run, an ``--overwrite`` that deletes only
what edit.py wrote and only after the model and data load, and a failed start that leaves nothing
behind to refuse the corrected command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factedit.evaluation.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny random model folder and a two-record CounterFact file, shared by this module."""
    from helpers import build_llama

    folder = tmp_path_factory.mktemp("inputs")
    build_llama(len(tokenizer)).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rows = [
        {
            "case_id": i,
            "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new}, "target_true": {"str": true}, "relation_id": "P1"},
            "paraphrase_prompts": [f"Indeed. {prompt.format(subject)}"],
            "neighborhood_prompts": ["The capital of Italy is"],
            "generation_prompts": [f"{subject} is"],
        }
        for i, (prompt, subject, new, true) in enumerate([("The mother tongue of {} is", "Danielle Darrieux", "English", "French"), ("{} is located in", "Angola", "Antarctica", "Africa")])
    ]
    (folder / "cf.json").write_text(json.dumps(rows))
    return folder / "model", folder / "cf.json"


def _cli(inputs, out, *extra, model=None, data=None):
    model_dir, data_file = inputs
    args = ["--editor", "ft_m", "--model", str(model or model_dir), "--data", str(data or data_file), "--out", str(out), "--limit", "1"]
    return main(args + ["--editor.layers", "[1]", "--editor.steps", "2", "--eval.generation_length", "4", "--progress", "false", *extra])


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> Path:
    """A finished one-case run made by edit.py."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _cli(inputs, out)["cases"] == 1
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of the finished run that a test may change."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".factedit-lock"}


# -- the folder itself -----------------------------------------------------------------------------
def test_reset_deletes_only_what_edit_py_writes(tmp_path):
    from factedit.evaluation.run_dir import FILES, FOLDERS, LOCK, MARKER, RunDir

    run = RunDir(tmp_path / "run")
    with run.claim():
        for name in FILES:
            (run.root / name).write_text("x")
        for name in FOLDERS:
            (run.root / name).mkdir()
            (run.root / name / "inside").write_text("x")
        (run.root / ".cases.jsonl.partial").write_text("torn")
        (run.root / "notes.txt").write_text("mine")
        run.reset()
    assert sorted(p.name for p in run.root.iterdir()) == sorted([LOCK, MARKER, "notes.txt"])
    assert {run.shards, run.edits, run.tensorboard, run.summary, run.config} & set(run.root.iterdir()) == set()


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A run killed with SIGKILL leaves no lock behind: the kernel drops it with the process."""
    from factedit.evaluation.run_dir import RunDir, RunDirLocked

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from factedit.evaluation.run_dir import RunDir; held = RunDir(sys.argv[1]).claim(); held.__enter__(); print('held', flush=True); time.sleep(120)", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"in use by another edit.py run \(pid {holder.pid} on .+, since \d{{4}}-"):
            with RunDir(out).claim():
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDir(out).claim():
        pass


def test_only_the_main_process_of_a_sharded_run_takes_the_lock(tmp_path):
    from factedit.evaluation.cli import claimed
    from factedit.evaluation.distributed import Shard
    from factedit.evaluation.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    with claimed(run, Shard(0, 2)):
        with claimed(run, Shard(1, 2)):  # another rank of the same run: not refused
            pass
        with pytest.raises(SystemExit, match="in use"):
            with claimed(run, Shard(0, 2)):
                pass


# -- edit.py -----------------------------------------------------------------------------------
def test_second_run_into_one_folder_is_refused_before_the_model_loads(inputs, tmp_path, monkeypatch):
    from factedit import models as evaluation_models
    from factedit.evaluation.run_dir import RunDir

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a run that must be refused")

    monkeypatch.setattr(evaluation_models, "load_model", must_not_load)
    out = tmp_path / "run"
    with RunDir(out).claim():
        with pytest.raises(SystemExit, match=r"edit.py: error: .* in use by another edit.py run \(pid \d+ on .+, since "):
            _cli(inputs, out)
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_folder_edit_py_did_not_make_is_refused_and_left_untouched(inputs, tmp_path, overwrite):
    out = tmp_path / "mine"
    (out / "edits").mkdir(parents=True)
    (out / "edits" / "keep.bin").write_bytes(b"\x00\x01")
    (out / "summary.json").write_text('{"mine": true}')
    (out / "config.yaml").write_text("unrelated: true\n")
    (out / "notes.txt").write_text("notes")
    before = _contents(out)
    with pytest.raises(SystemExit, match="not made by edit.py"):
        _cli(inputs, out, *(["--overwrite"] if overwrite else []))
    assert _contents(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "edits", "notes.txt", "summary.json"]


def test_overwrite_removes_stale_shards_and_keeps_other_files(inputs, run_copy):
    """Shard files left by an interrupted sharded run were merged into the next run and skipped
    its cases; --overwrite discards them, and keeps files edit.py did not write."""
    case = json.loads((run_copy / "cases.jsonl").read_text().splitlines()[0])
    (run_copy / "shards").mkdir()
    (run_copy / "shards" / "cases-1.jsonl").write_text(json.dumps({**case, "stale": True}) + "\n")
    (run_copy / "notes.txt").write_text("mine")
    assert _cli(inputs, run_copy, "--overwrite")["cases"] == 1
    assert not (run_copy / "shards").exists()
    assert not any("stale" in json.loads(line) for line in (run_copy / "cases.jsonl").read_text().splitlines())
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_overwrite_deletes_nothing_when_the_model_or_data_fail(inputs, run_copy, tmp_path):
    before = _contents(run_copy)
    with pytest.raises(SystemExit, match="cannot load model"):
        _cli(inputs, run_copy, "--overwrite", model=tmp_path / "no-model")
    (tmp_path / "bad.json").write_text('[{"requested_rewrite": {}}]')
    with pytest.raises(SystemExit, match="bad.json"):
        _cli(inputs, run_copy, "--overwrite", data=tmp_path / "bad.json")
    with pytest.raises(SystemExit, match="layers"):  # editor settings that do not fit the model (3 blocks)
        _cli(inputs, run_copy, "--overwrite", "--editor.layers", "[7]")
    assert _contents(run_copy) == before


def test_failed_start_leaves_no_config_and_the_corrected_command_runs(inputs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="cannot load model"):
        _cli(inputs, out, model=tmp_path / "typo")
    with pytest.raises(SystemExit, match="general-ability suite needs"):
        _cli(inputs, out, "--general.tasks", "[piqa]")
    assert not (out / "config.yaml").exists()
    assert _cli(inputs, out)["cases"] == 1


def test_differing_settings_are_named_by_key_with_both_values(inputs, run_copy):
    with pytest.raises(SystemExit) as refused:
        _cli(inputs, run_copy, "--editor.lr", "0.001", "--eval.generation_length", "5")
    message = str(refused.value)
    assert "editor.lr: 0.0005 -> 0.001" in message and "eval.generation_length: 4 -> 5" in message
    assert "editor.steps" not in message


def test_a_run_folder_from_before_a_setting_existed_resumes_as_it_ran(inputs, run_copy):
    """A folder made before eval.case_batch existed measured each case alone: resumed with
    case_batch 1 it continues, with the default it is refused, naming the old behaviour."""
    import yaml

    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    del config["eval"]["case_batch"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"eval.case_batch: 1 -> 32"):
        _cli(inputs, run_copy)
    summary = json.loads((run_copy / "summary.json").read_text())
    assert _cli(inputs, run_copy, "--eval.case_batch", "1")["metrics"] == summary["metrics"]


def test_a_run_folder_from_before_the_marker_is_still_resumed(inputs, run_copy):
    """Folders written before edit.py marked its folders count as its own when their config.yaml
    is an edit.py config; they are marked when resumed."""
    (run_copy / ".factedit-run").unlink()
    summary = json.loads((run_copy / "summary.json").read_text())
    assert _cli(inputs, run_copy)["metrics"] == summary["metrics"]
    assert (run_copy / ".factedit-run").is_file()
