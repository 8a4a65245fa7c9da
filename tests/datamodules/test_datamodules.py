"""Named sources (bundled files, verified downloads) and the tokenizing LightningDataModules."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from factedit import datamodules
from lightning.fabric.utilities.data import _set_sampler_epoch

from factedit.batches import IGNORE_INDEX
from factedit.datamodules.edit_datamodule import (
    BATCH_PARTS,
    PARTS,
    CounterFactDataModule,
    EditDataModule,
    EpochShuffle,
    ZsREDataModule,
    prompt_template,
    split_indices,
    template_ids,
)
from factedit.datamodules.records import load_requests
from factedit.datamodules.sources import (
    SOURCES,
    Source,
    SourceError,
    cache_dir,
    download_file,
    ensure_downloaded,
    resolve_source,
    source_path,
)

# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_demo_names_resolve_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    package = Path(datamodules.__file__).resolve().parent
    assert source_path(SOURCES["counterfact-demo"]) == package / "demo" / "demo_counterfact.json"
    assert source_path(SOURCES["zsre-demo"]) == package / "demo" / "demo_zsre.json"
    assert (SOURCES["counterfact-demo"].format, SOURCES["zsre-demo"].format) == ("counterfact", "zsre")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "data"
    monkeypatch.delenv("FACTEDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "factedit" / "data"


def test_full_counterfact_is_verified_by_its_published_checksum():
    entry = SOURCES["counterfact"]
    assert entry.sha256 == "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"
    assert entry.size == 45_108_470 and entry.url == "https://rome.baulab.info/data/dsets/counterfact.json"


def _served(tmp_path: Path, content: bytes) -> tuple[str, str]:
    origin = tmp_path / "origin" / "remote.json"
    origin.parent.mkdir()
    origin.write_bytes(content)
    return origin.as_uri(), hashlib.sha256(content).hexdigest()


def test_download_verifies_and_writes_atomically(tmp_path):
    url, digest = _served(tmp_path, b"[]")
    dest = tmp_path / "cache" / "file.json"
    assert download_file(url, dest, sha256=digest, size=2) == dest
    assert dest.read_bytes() == b"[]"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.json"]


@pytest.mark.parametrize("sha256, size, match", [("0" * 64, None, "failed verification"), (None, 3, "incomplete or wrong")])
def test_failed_verification_leaves_no_file(tmp_path, sha256, size, match):
    url, _ = _served(tmp_path, b"[]")
    dest = tmp_path / "cache" / "file.json"
    with pytest.raises(SourceError, match=match):
        download_file(url, dest, sha256=sha256, size=size)
    assert list(dest.parent.iterdir()) == []


def test_unknown_checksum_keeps_the_file_and_logs_its_digest(tmp_path, caplog):
    url, digest = _served(tmp_path, b"[1]")
    with caplog.at_level(logging.WARNING, logger="factedit.datamodules.sources"):
        dest = download_file(url, tmp_path / "cache" / "file.json", sha256=None)
    assert dest.read_bytes() == b"[1]" and digest in caplog.text


def test_offline_download_says_to_pass_a_local_path(tmp_path):
    dest = tmp_path / "cache" / "file.json"
    with pytest.raises(SourceError, match="pass its local path instead"):
        download_file((tmp_path / "nowhere.json").as_uri(), dest)
    assert list(dest.parent.iterdir()) == []


def test_ensure_downloaded_fetches_once_and_repairs_a_corrupt_cache(tmp_path):
    url, digest = _served(tmp_path, b"[]")
    entry = Source(name="tiny", format="zsre", filename="tiny.json", description="test", url=url, sha256=digest)
    directory = tmp_path / "cache"
    with pytest.raises(SourceError, match="not downloaded yet"):
        ensure_downloaded(entry, download=False, directory=directory)
    path = ensure_downloaded(entry, directory=directory)
    assert path == directory / "tiny.json" and path.read_bytes() == b"[]"
    path.write_bytes(b"[0]")  # corrupt the cached copy
    assert ensure_downloaded(entry, directory=directory).read_bytes() == b"[]"


def test_a_source_without_checksum_is_pinned_at_first_download(tmp_path):
    url, digest = _served(tmp_path, b"[]")
    entry = Source(name="tiny", format="zsre", filename="tiny.json", description="test", url=url, sha256=None)
    directory = tmp_path / "cache"
    path = ensure_downloaded(entry, directory=directory)
    assert (directory / "tiny.json.sha256").read_text().strip() == digest
    assert ensure_downloaded(entry, download=False, directory=directory) == path  # the pin matches
    path.write_bytes(b"[0]")  # the cached copy changed after the first download
    with pytest.raises(SourceError, match="not downloaded yet"):
        ensure_downloaded(entry, download=False, directory=directory)
    assert ensure_downloaded(entry, directory=directory).read_bytes() == b"[]"  # fetched again


def test_named_full_dataset_is_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="not downloaded yet"):
        resolve_source("counterfact", download=False)
    cached = tmp_path / "data" / SOURCES["zsre"].filename
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps([zsre_record(0)]))
    assert resolve_source("zsre", download=False) == (cached, "zsre")
    assert load_requests("zsre")[0].target_new == "new 0"


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("zsre").write_text(json.dumps([zsre_record(0)]))
    assert resolve_source("zsre") == (Path("zsre"), None)


# --------------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------------

TARGETS = ["English", "French", "Paris", "Rome", "Africa", "the guitar", "Antarctica"]


def counterfact_record(i: int) -> dict[str, Any]:
    subject = f"Person {i}"
    return {
        "case_id": 100 + i,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": subject,
            "target_new": {"str": TARGETS[i % len(TARGETS)]},
            "target_true": {"str": TARGETS[(i + 1) % len(TARGETS)]},
        },
        "paraphrase_prompts": [f"{subject} speaks"] if i % 3 else [],
        "neighborhood_prompts": [f"The mother tongue of Neighbour {i} is", "unused second neighbour"],
        "attribute_prompts": [],
        "generation_prompts": [],
    }


def zsre_record(i: int) -> dict[str, Any]:
    return {
        "subject": f"Thing {i}",
        "src": f"When was Thing {i} founded?",
        "rephrase": f"In which year was Thing {i} founded?",
        "alt": f"new {i}",
        "answers": [f"old {i}"],
        "loc": "nq question: who plays the cat in the hat movie",
        "loc_ans": "Mike Myers",
    }


@pytest.fixture
def counterfact_file(tmp_path: Path) -> Path:
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([counterfact_record(i) for i in range(20)]))
    return path


def make_module(path: Path, tokenizer, **kwargs: Any) -> EditDataModule:
    module = EditDataModule(str(path), tokenizer=tokenizer, **kwargs)
    module.prepare_data()
    module.setup("fit")
    return module


def test_batches_label_exactly_the_target(counterfact_file, tokenizer):
    module = make_module(counterfact_file, tokenizer, batch_size=4, val_fraction=0.25)
    requests = {r.case_id: r for r in module.train_requests + module.val_requests}
    seen = 0
    for loader in (module.train_dataloader(), module.val_dataloader()):
        for batch in loader:
            assert set(batch) == {"case_id", *BATCH_PARTS} and set(PARTS) < set(BATCH_PARTS)
            for part in BATCH_PARTS:
                sub = batch[part]
                assert set(sub) == {"input_ids", "attention_mask", "labels"}
                assert sub["input_ids"].shape == sub["attention_mask"].shape == sub["labels"].shape
                assert sub["input_ids"].dtype == torch.long
            for row, case_id in enumerate(batch["case_id"]):
                request = requests[case_id]
                rephrase = request.rephrase_prompts[0] if request.rephrase_prompts else request.prompt
                expected = {
                    "edit": (request.prompt, request.target_new),
                    "rephrase": (rephrase, request.target_new),
                    "locality": (request.locality[0].prompt, request.locality[0].answer),
                    "contrast": (request.locality[0].prompt, request.target_new),
                }
                for part, (prompt, target) in expected.items():
                    ids, mask, labels = (batch[part][k][row] for k in ("input_ids", "attention_mask", "labels"))
                    length = int(mask.sum())
                    assert mask[:length].all() and not mask[length:].any()  # right padding
                    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
                    span = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
                    assert span == list(range(length - len(target_ids), length))  # exactly the target tokens
                    assert labels[span].tolist() == target_ids == ids[span].tolist()
                    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == " " + target
                    assert tokenizer.decode(ids[:length]) == prompt + " " + target
                seen += 1
    assert seen == 20


def test_split_is_deterministic_and_disjoint(counterfact_file, tokenizer):
    def ids(module: EditDataModule) -> tuple[list[str], list[str]]:
        return [r.case_id for r in module.train_requests], [r.case_id for r in module.val_requests]

    train, val = ids(make_module(counterfact_file, tokenizer, val_fraction=0.25, seed=1))
    assert (train, val) == ids(make_module(counterfact_file, tokenizer, val_fraction=0.25, seed=1))
    assert len(val) == 5 and not set(train) & set(val) and len(train) + len(val) == 20
    assert val != ids(make_module(counterfact_file, tokenizer, val_fraction=0.25, seed=2))[1]
    assert len(split_indices(5, 0.01, 0)[1]) == 1 and len(split_indices(5, 0.99, 0)[1]) == 4
    assert split_indices(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])


def test_limit_and_training_order_follow_the_seed(counterfact_file, tokenizer):
    module = make_module(counterfact_file, tokenizer, limit=8, val_fraction=0.0, batch_size=8)
    assert len(module.train_requests) == 8 and module.val_requests == []
    first = next(iter(module.train_dataloader()))["case_id"]
    again = make_module(counterfact_file, tokenizer, limit=8, val_fraction=0.0, batch_size=8)
    assert next(iter(again.train_dataloader()))["case_id"] == first
    assert sorted(first) == sorted(r.case_id for r in module.train_requests)


def test_zsre_locality_keeps_the_nq_prefix(tmp_path, tokenizer):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([zsre_record(i) for i in range(4)]))
    module = make_module(path, tokenizer, val_fraction=0.0)
    batch = next(iter(module.train_dataloader()))
    row = batch["locality"]
    text = tokenizer.decode(row["input_ids"][0][row["attention_mask"][0].bool()])
    assert text == "nq question: who plays the cat in the hat movie Mike Myers"


def test_requests_without_locality_are_left_out(tmp_path, tokenizer, caplog):
    records = [zsre_record(i) for i in range(4)]
    del records[2]["loc"], records[2]["loc_ans"]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING, logger="factedit.datamodules.edit_datamodule"):
        module = make_module(path, tokenizer, val_fraction=0.0)
    assert [r.case_id for r in module.train_requests] == ["0", "1", "3"] and "no locality probe" in caplog.text


def test_pads_with_eos_when_the_tokenizer_has_no_pad_token(counterfact_file, tokenizer):
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert no_pad.pad_token_id is None
    module = make_module(counterfact_file, no_pad, batch_size=20, val_fraction=0.0)
    batch = next(iter(module.train_dataloader()))
    padding = batch["edit"]["input_ids"][batch["edit"]["attention_mask"] == 0]
    assert padding.numel() > 0 and (padding == no_pad.eos_token_id).all()
    assert no_pad.pad_token is None  # the caller's tokenizer is left as it was


def test_a_tokenizer_name_is_loaded_lazily(counterfact_file, tokenizer, monkeypatch):
    calls: list[str] = []

    def load_tokenizer(name_or_path: str):
        calls.append(name_or_path)
        return tokenizer

    monkeypatch.setitem(sys.modules, "factedit.models", types.SimpleNamespace(load_tokenizer=load_tokenizer))
    module = EditDataModule(str(counterfact_file), tokenizer="tiny-model", val_fraction=0.0)
    assert calls == [] and module.hparams["tokenizer"] == "tiny-model"
    module.setup("fit")
    next(iter(module.train_dataloader()))
    assert calls == ["tiny-model"]


def test_subclasses_default_to_the_demo_sets(tokenizer):
    assert CounterFactDataModule(tokenizer=tokenizer).data == "counterfact-demo"
    assert ZsREDataModule(tokenizer=tokenizer).data == "zsre-demo"


@pytest.mark.parametrize("kwargs, match", [({"val_fraction": 1.0}, "val_fraction"), ({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length")])
def test_bad_settings_are_refused(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EditDataModule("x.json", tokenizer=tokenizer, **kwargs)


def test_dataloader_before_setup(tokenizer):
    with pytest.raises(RuntimeError, match="setup"):
        EditDataModule("x.json", tokenizer=tokenizer).train_dataloader()


# Grouped training batches (hard negatives for SERAC's scope classifier)

TEMPLATES = ["The mother tongue of {} is", "{} is located in", "{} plays the", "The capital of {} is"]


@pytest.fixture
def templated_file(tmp_path: Path) -> Path:
    """24 CounterFact records, 6 per template, in the file interleaved across templates."""
    records = []
    for i in range(24):
        record = counterfact_record(i)
        record["requested_rewrite"]["prompt"] = TEMPLATES[i % len(TEMPLATES)]
        records.append(record)
    path = tmp_path / "templated.json"
    path.write_text(json.dumps(records))
    return path


def epoch_batches(module: EditDataModule, epoch: int) -> list[list[str]]:
    loader = module.train_dataloader()
    _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls at each epoch
    return [batch["case_id"] for batch in loader]


def test_prompt_templates_replace_the_subject(request_factory):
    request = request_factory()
    assert prompt_template(request) == "The mother tongue of {} is"
    stray = types.SimpleNamespace(prompt="Who is it?", subject="Danielle Darrieux")  # EditRequest refuses it
    assert prompt_template(stray) is None
    # the same template shares a group; each request without one has a group of its own
    assert template_ids([request, stray, request_factory("2"), stray]) == [0, 1, 0, 2]


def test_template_batches_cover_every_request_once_per_epoch(templated_file, tokenizer):
    module = make_module(templated_file, tokenizer, batch_size=5, val_fraction=0.25, group_by="template")
    train_ids = sorted(r.case_id for r in module.train_requests)
    assert len(train_ids) == 18
    for epoch in range(3):
        batches = epoch_batches(module, epoch)
        assert sorted(sum(batches, [])) == train_ids
        assert sorted(len(b) for b in batches) == [3, 5, 5, 5]  # not drop_last: one short batch
    assert module.val_dataloader().batch_sampler.batch_size == 5  # validation is not grouped


def test_template_batches_follow_seed_and_epoch(templated_file, tokenizer):
    module = make_module(templated_file, tokenizer, batch_size=3, val_fraction=0.0, group_by="template")
    first = epoch_batches(module, 0)
    assert epoch_batches(module, 0) == first
    assert epoch_batches(module, 1) != first
    assert epoch_batches(make_module(templated_file, tokenizer, batch_size=3, val_fraction=0.0, group_by="template", seed=1), 0) != first


def test_template_batches_are_pure_when_templates_fill_whole_batches(templated_file, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="factedit.datamodules.edit_datamodule"):
        module = make_module(templated_file, tokenizer, batch_size=3, val_fraction=0.0, group_by="template")
    assert "4 prompt templates among 24 training requests" in caplog.text
    assert "share the edit's template 100.0% of the time" in caplog.text
    template_of = {r.case_id: prompt_template(r) for r in module.train_requests}
    for epoch in range(3):
        batches = epoch_batches(module, epoch)
        assert len(batches) == 8 and all(len({template_of[c] for c in batch}) == 1 for batch in batches)
        # the batches of one template are spread over the epoch, not consecutive
        assert epoch > 0 or [template_of[b[0]] for b in batches] != sorted(template_of[b[0]] for b in batches)


def test_a_resumed_run_sees_the_same_template_batches(templated_file, tokenizer):
    settings = dict(batch_size=4, val_fraction=0.25, group_by="template", seed=3)
    run = make_module(templated_file, tokenizer, **settings)
    uninterrupted = [epoch_batches(run, epoch) for epoch in range(3)]
    resumed = make_module(templated_file, tokenizer, **settings)  # a new process, starting at epoch 2
    assert epoch_batches(resumed, 2) == uninterrupted[2]


def test_unknown_group_by_is_refused(tokenizer):
    with pytest.raises(ValueError, match="group_by must be one of None, 'template'"):
        EditDataModule("x.json", tokenizer=tokenizer, group_by="relation")
    assert CounterFactDataModule(tokenizer=tokenizer, group_by="template").group_by == "template"
    assert ZsREDataModule(tokenizer=tokenizer, group_by="template").hparams["group_by"] == "template"


def test_default_training_order_is_the_epoch_shuffle(templated_file, tokenizer):
    module = make_module(templated_file, tokenizer, batch_size=5, val_fraction=0.25, seed=2)
    ids = [r.case_id for r in module.train_requests]
    for epoch in (0, 1):
        shuffle = EpochShuffle(len(ids), seed=2)
        shuffle.set_epoch(epoch)
        expected = [ids[i] for i in shuffle]
        assert epoch_batches(module, epoch) == [expected[s : s + 5] for s in range(0, len(ids), 5)]


def test_mquake_is_verified_by_its_git_blob_id():
    entry = SOURCES["mquake"]
    assert entry.git_blob == "b9d0963c6c1c81b24d8113ffdc3fd0865a423e18"
    assert entry.url == "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k.json"


def test_git_blob_id_is_gits_and_a_mismatch_leaves_no_file(tmp_path):
    from factedit.datamodules.sources import git_blob_of

    url, _ = _served(tmp_path, b"hello\n")
    dest = tmp_path / "cache" / "file.json"
    # `printf 'hello\n' | git hash-object --stdin`
    assert download_file(url, dest, git_blob="ce013625030ba8dba906f756967f9e9ca394464a") == dest
    assert git_blob_of(dest) == "ce013625030ba8dba906f756967f9e9ca394464a"
    dest.unlink()
    with pytest.raises(SourceError, match="git blob id"):
        download_file(url, dest, git_blob="0" * 40)
    assert list(dest.parent.iterdir()) == []
