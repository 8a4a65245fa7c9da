"""Where results come from: package versions, the git commit, the data file's hash."""

from __future__ import annotations

import datetime
import hashlib
import json
import re

from factedit.editors.core.provenance import PACKAGES, git_state, package_versions, software
from factedit.evaluation.provenance import data_provenance, run_provenance


def test_software_names_every_package_and_a_utc_date():
    found = software()
    assert set(found) == {"versions", "git_commit", "git_dirty", "date"}
    assert set(found["versions"]) == {"python", *PACKAGES} == {"python", "torch", "transformers", "factedit", "lightning", "torchmetrics", "datasets"}
    assert found["versions"]["torch"] == __import__("torch").__version__
    assert found["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", found["git_commit"])
    assert datetime.datetime.fromisoformat(found["date"]).utcoffset() == datetime.timedelta(0)
    json.dumps(found)  # goes into JSON files as it is


def test_git_state_is_none_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) == (None, None)
    (tmp_path / "inner").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "inner"))  # no git program at all
    assert git_state() == (None, None)
    assert package_versions()["python"]


def test_data_provenance_hashes_the_file_and_resolves_named_sources(tmp_path):
    from factedit.datamodules.sources import SOURCES, source_path

    path = tmp_path / "records.json"
    path.write_text('[{"case_id": 1}]')
    found = data_provenance(str(path))
    assert found == {"data": str(path), "data_file": str(path.resolve()), "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    bundled = source_path(SOURCES["counterfact-demo"])
    named = data_provenance("counterfact-demo")
    assert named["data"] == "counterfact-demo" and named["data_file"] == str(bundled.resolve())
    assert named["data_sha256"] == hashlib.sha256(bundled.read_bytes()).hexdigest()
    assert data_provenance(str(tmp_path / "missing.json")) == {"data": str(tmp_path / "missing.json"), "data_file": None, "data_sha256": None}
    assert data_provenance(None)["data_sha256"] is None


def test_run_provenance_fingerprints_the_model(tiny_model):
    from factedit.models import model_fingerprint

    found = run_provenance(tiny_model, "tiny")
    assert found["model"] == "tiny" and found["model_fingerprint"] == model_fingerprint(tiny_model)
    assert found["data"] is None and set(found["versions"]) == {"python", *PACKAGES}
