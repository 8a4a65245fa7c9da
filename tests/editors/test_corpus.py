"""Corpus specs: model samples are reproducible and cached, local files and folders read as documented."""

from __future__ import annotations

import json
import logging

import pytest

from factedit.editors.core import corpus
from factedit.editors.core.corpus import CorpusError, model_samples, open_corpus
from factedit.models import model_fingerprint
from helpers import build_gpt2, build_llama, build_tokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache root, never the user's."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def llama(tokenizer):
    return build_llama(len(tokenizer))


@pytest.mark.parametrize("build", [build_gpt2, build_llama])
def test_model_samples_are_reproducible_per_seed(build, tokenizer):
    model = build(len(tokenizer))
    first = model_samples(model, tokenizer, 5, length=12, seed=0, batch_size=2, progress=False)
    again = model_samples(model, tokenizer, 5, length=12, seed=0, batch_size=2, progress=False)
    other = model_samples(model, tokenizer, 5, length=12, seed=1, batch_size=2, progress=False)
    assert len(first) == 5 and all(isinstance(text, str) and text for text in first)
    assert first == again
    assert first != other
    assert len(set(first)) == 5, "the texts of one batch must differ"



def resolve_corpus(spec, model, tokenizer, n_texts, **kwargs):
    """``(texts, corpus id)`` of a corpus spec, as the statistics read them."""
    source = open_corpus(spec, model, tokenizer, n_texts, **kwargs)
    return source.load(), source.id

def test_model_samples_bar_moves_at_every_step_and_the_cost_is_logged_first(tokenizer, monkeypatch, caplog):
    """The bar counts sampled tokens, one update per decoding step, and the log states the work
    before the first step; the texts are the same with the bar on or off."""
    updates: list[tuple[int, int]] = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n):
            updates.append((self.total, n))

        def close(self):
            pass

    model = build_llama(len(tokenizer))
    quiet = model_samples(model, tokenizer, 5, length=3, seed=0, batch_size=2, progress=False)
    monkeypatch.setattr(corpus, "tqdm", Recorder)
    with caplog.at_level(logging.INFO, logger="factedit.editors.core.corpus"):
        shown = model_samples(model, tokenizer, 5, length=3, seed=0, batch_size=2, progress=True)
    assert shown == quiet
    assert [n for _, n in updates] == [2, 2, 2, 2, 2, 2, 1, 1, 1]  # three batches (2, 2, 1 rows) of 3 steps
    assert {total for total, _ in updates} == {15}
    assert "5 texts of 3 tokens" in caplog.text and "9 decoding steps in 3 batch(es)" in caplog.text


def _first_inputs(model, run) -> list[int]:
    """The token ids the model's embedding saw on its first call during ``run()``."""
    seen = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]) if not seen else None)
    try:
        run()
    finally:
        handle.remove()
    return seen[0].reshape(-1).tolist()


def test_model_samples_start_from_bos_else_eos(tokenizer):
    model = build_llama(len(tokenizer))
    first = _first_inputs(model, lambda: model_samples(model, tokenizer, 3, length=2, progress=False))
    assert first == [tokenizer.eos_token_id] * 3  # the tiny tokenizer has no BOS
    with_bos = build_tokenizer()
    with_bos.add_special_tokens({"bos_token": "<s>"})
    model = build_llama(len(with_bos))
    first = _first_inputs(model, lambda: model_samples(model, with_bos, 2, length=2, progress=False))
    assert first == [with_bos.bos_token_id] * 2 != [with_bos.eos_token_id] * 2


def test_model_samples_refuse_more_tokens_than_positions(tokenizer):
    with pytest.raises(ValueError, match="positions"):
        model_samples(build_gpt2(len(tokenizer)), tokenizer, 1, length=128, progress=False)


def test_model_spec_samples_once_and_then_reads_the_cache(llama, tokenizer, monkeypatch, tmp_path, caplog):
    calls = []
    real = corpus.model_samples

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus, "model_samples", counting)
    texts, corpus_id = resolve_corpus("model", llama, tokenizer, 3, length=8, seed=2, progress=False)
    fingerprint = model_fingerprint(llama)
    assert corpus_id == f"model-samples:{fingerprint}:8:2"
    path = tmp_path / "cache" / "corpus" / f"model-{fingerprint}-3-8-2.jsonl"
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == texts
    assert list(path.parent.iterdir()) == [path], "no temporary file is left behind"
    again, again_id = resolve_corpus("model", llama, tokenizer, 3, length=8, seed=2, progress=False)
    assert (again, again_id) == (texts, corpus_id) and calls == [3]
    # A damaged cache is sampled again, with a warning, and gives the same texts.
    path.write_text('{"text": "only one"}\n')
    with caplog.at_level(logging.WARNING, logger="factedit.editors.core.corpus"):
        repaired, _ = resolve_corpus("model", llama, tokenizer, 3, length=8, seed=2, progress=False)
    assert repaired == texts and calls == [3, 3]
    assert "damaged corpus cache" in caplog.text


def test_model_spec_is_named_by_the_given_model_id(llama, tokenizer, tmp_path):
    _, corpus_id = resolve_corpus("model", llama, tokenizer, 1, length=4, model_id="unedited", progress=False)
    assert corpus_id == "model-samples:unedited:4:0"
    assert (tmp_path / "cache" / "corpus" / "model-unedited-1-4-0.jsonl").is_file()
    _, corpus_id = resolve_corpus("model", llama, tokenizer, 1, length=4, model_id="org/model", progress=False)
    assert corpus_id == "model-samples:org/model:4:0"
    assert len(list((tmp_path / "cache" / "corpus").glob("model-*-1-4-0.jsonl"))) == 2, "an unsafe id is hashed into the file name"


def test_txt_paragraphs_or_lines(tmp_path, llama, tokenizer):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("First paragraph,\nstill first.\n\n  \nSecond one.\n\n\nThird.\n")
    texts, corpus_id = resolve_corpus(str(paragraphs), llama, tokenizer, 2)
    assert texts == ["First paragraph,\nstill first.", "Second one."]
    assert corpus_id.startswith("file:") and len(corpus_id) == len("file:") + 16
    windows = tmp_path / "windows.txt"
    windows.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert resolve_corpus(str(windows), llama, tokenizer, 10)[0] == ["one\ntwo", "three"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert resolve_corpus(str(lines), llama, tokenizer, 10)[0] == ["one", "two", "three"]
    # The identity follows the content, not the name.
    paragraphs.write_text("Changed.\n\nText.\n")
    assert resolve_corpus(str(paragraphs), llama, tokenizer, 2)[1] != corpus_id


def test_folder_reads_its_txt_files_in_name_order(tmp_path, llama, tokenizer):
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "a.txt").write_text("from a, first\n\nfrom a, second\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    texts, corpus_id = resolve_corpus(str(tmp_path), llama, tokenizer, 10)
    assert texts == ["from a, first", "from a, second", "from b"]
    assert corpus_id.startswith("file:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"no \*\.txt files"):
        resolve_corpus(str(tmp_path / "empty"), llama, tokenizer, 10)


def test_jsonl_and_json_records(tmp_path, llama, tokenizer):
    records = [{"text": "one"}, {"text": "  "}, {"text": "two", "id": 3}, {"text": "three"}]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert resolve_corpus(str(jsonl), llama, tokenizer, 2)[0] == ["one", "two"]
    as_list = tmp_path / "corpus.json"
    as_list.write_text(json.dumps(records))
    assert resolve_corpus(str(as_list), llama, tokenizer, 5)[0] == ["one", "two", "three"]


def test_record_without_text_is_named(tmp_path, llama, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text here"}\n')
    with pytest.raises(CorpusError, match=r"broken\.jsonl: record 1 \(line 3\) has no string field 'text' \(found fields \['body'\]\)"):
        resolve_corpus(str(path), llama, tokenizer, 10)


def test_unknown_and_empty_corpora(tmp_path, llama, tokenizer):
    with pytest.raises(ValueError, match=r"unknown corpus 'wikipedia'.*'model'.*\.txt.*\.jsonl.*hf:<dataset>"):
        resolve_corpus("wikipedia", llama, tokenizer, 10)
    odd = tmp_path / "corpus.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        resolve_corpus(str(odd), llama, tokenizer, 10)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    with pytest.raises(ValueError, match="no non-empty texts"):
        resolve_corpus(str(blank), llama, tokenizer, 10)


def test_hf_spec_reads_the_text_column_or_explains_the_failure(llama, tokenizer, monkeypatch):
    import datasets

    seen = []

    def fake_load(name, config, split):
        seen.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["", "alpha", "beta", "gamma"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    texts, corpus_id = resolve_corpus("hf:wikitext:wikitext-2-raw-v1", llama, tokenizer, 2)
    assert texts == ["alpha", "beta"] and seen == [("wikitext", "wikitext-2-raw-v1", "train")]
    assert corpus_id.startswith("hf:wikitext:wikitext-2-raw-v1:train:")
    resolve_corpus("hf:org/set::test", llama, tokenizer, 2)
    assert seen[-1] == ("org/set", None, "test")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match=r"local Hugging Face cache.*corpus='model'"):
        resolve_corpus("hf:wikitext", llama, tokenizer, 2)
    with pytest.raises(CorpusError, match="expected 'hf:<dataset>"):
        resolve_corpus("hf:a:b:c:d", llama, tokenizer, 2)
