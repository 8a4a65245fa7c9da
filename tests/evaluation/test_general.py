"""General-ability suite (evaluation/general.py): tiny random models, tiny fixture files in every raw format."""

from __future__ import annotations

import bz2
import copy
import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from helpers.safety_data import write_safety_fixture
from factedit.evaluation.general.tasks import SAFETY_TASKS
from factedit.evaluation.general import (
    HEADLINE,
    TASKS,
    GeneralConfig,
    MissingDataError,
    PrefixScorer,
    UnknownTaskError,
    default_data_dir,
    evaluate_general,
    hub_task_names,
    run_general,
)
from factedit.evaluation.general.data import prepare_local
from factedit.evaluation.general.readers import read_hellaswag, read_wikitext
from factedit.evaluation.general.suite import in_memory_lm

ARC_EASY = [
    {"id": "q0", "prompt": "What is the capital of France?", "choices": ["Paris", "Rome", "Africa", "English"], "answer_idx": 0},
    {"id": "q1", "prompt": "Where is Angola located?", "choices": ["Europe", "Africa", "Antarctica"], "answer_idx": 1},
    {"id": "q2", "prompt": "What does Toko Yasuda play?", "choices": ["the guitar", "French", "Rome", "the company", "1998"], "answer_idx": 0},
]


def write_fixture_data(root: Path) -> Path:
    """A few items of every benchmark, each in the raw format of the shared data folder."""

    def jsonl(relative: str, rows: list[dict]) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    for split, count in (("test", 3), ("dev", 5)):
        for subject in ("astronomy", "virology"):
            path = root / "mmlu" / "data" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for i in range(count):
                    writer.writerow([f"{subject} {split} question {i}, is it?", "Paris", "Rome", "1998", "French", i % 4])
    jsonl("gsm8k/test.jsonl", [{"question": f"What is {i} plus {i}?", "answer": f"It is <<{i}+{i}={2 * i}>>{2 * i}.\n#### {2 * i}"} for i in range(3)])
    for task, description in (("boolean_expressions", "Evaluate the result of a random Boolean expression."), ("word_sorting", "Sort a list of words.")):
        examples = [{"input": f"{task} input {i}", "target": "True" if i % 2 else "False"} for i in range(3)]
        (root / "bbh/bbh").mkdir(parents=True, exist_ok=True)
        (root / f"bbh/bbh/{task}.json").write_text(json.dumps({"canary": "canary", "examples": examples}))
        shots = "\n\n".join(f"Q: {task} shot {i}\nA: Let's think step by step.\nSome steps. So the answer is {'True' if i else 'False'}." for i in range(3))
        (root / "bbh/cot-prompts").mkdir(parents=True, exist_ok=True)
        (root / f"bbh/cot-prompts/{task}.txt").write_text(f"canary line\n-----\n{description}\n\n{shots}")
    jsonl(
        "commonsenseqa/dev_rand_split.jsonl",
        [
            {"answerKey": "B", "id": f"c{i}", "question": {"question_concept": "x", "stem": f"Where is the Eiffel Tower {i}?", "choices": [{"label": label, "text": text} for label, text in zip("ABCDE", ["Rome", "Paris", "Africa", "French", "guitar"])]}}
            for i in range(3)
        ],
    )
    jsonl("triviaqa/triviaqa_sm_sub.jsonl", [{"context": f"Question: What is the capital of France {i}?\nAnswer:", "answer": "Paris", "aliases": ["Paris", "Paris, France"]} for i in range(3)])
    mc = [
        {
            "question": f"What is the capital of Italy {i}?",
            "mc1_targets": {"Rome.": 1, "Paris.": 0, "Africa.": 0},
            "mc2_targets": {"Rome.": 1, "It is Rome.": 1, "Paris.": 0, "Africa.": 0},
        }
        for i in range(3)
    ]
    (root / "truthfulqa/data").mkdir(parents=True, exist_ok=True)
    (root / "truthfulqa/data/mc_task.json").write_text(json.dumps(mc))
    hellaswag = []
    for i in range(3):
        hellaswag += [f"Paris: The Eiffel Tower {i} is", str(i % 4), "located in Paris.", "a guitar.", "in Africa.", "French."]
    (root / "hellaswag").mkdir(parents=True, exist_ok=True)
    (root / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(("\n".join(hellaswag) + "\n").encode()))
    jsonl("arc/arc_easy_test.jsonl", ARC_EASY)
    jsonl(
        "arc/arc_challenge_test.jsonl",
        [
            {"index": i, "id": f"a{i}", "question": f"Which city is in France {i}?", "options": [{"label": label, "text": text} for label, text in zip("ABC", ["Rome", "Paris", "Africa"])], "answer": "B"}
            for i in range(3)
        ],
    )
    jsonl("piqa/valid.jsonl", [{"goal": f"How do I get to Paris {i}?", "sol1": "Take the train.", "sol2": "Play the guitar."} for i in range(3)])
    (root / "piqa/valid-labels.lst").write_text("0\n1\n0\n")
    jsonl("boolq/boolq.jsonl", [{"query": f"Passage: Paris is the capital of France {i}.\nQuestion: is paris in france?", "choices": ["no", "yes"], "gold": 1} for i in range(3)])
    jsonl("lambada/lambada_openai.jsonl", [{"context": f"The capital of France {i} is the city of", "continuation": "Paris"} for i in range(3)])
    wiki = [" = Paris = ", " Paris is the capital of France . It has 2 @,@ 100 @-@ 000 people . ", " = = History = = ", " It was founded long ago . ", " = Rome = ", " Rome is the capital of Italy . "]
    (root / "wikitext/wikitext-2-raw").mkdir(parents=True, exist_ok=True)
    (root / "wikitext/wikitext-2-raw/wiki.test.raw").write_bytes(("\r\n".join(wiki) + "\r\n").encode())
    write_safety_fixture(root / "safety")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fixture_data(tmp_path_factory.mktemp("general_data"))


@pytest.fixture(autouse=True)
def _cache(isolated_cache):
    return isolated_cache


def build(kind: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=2048, n_embd=32, n_layer=2, n_head=2, n_inner=64)).eval()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build("llama", len(tokenizer))


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward pass, tokenised as lm-eval does."""
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids[:-1]])).logits[0]
    scores = torch.log_softmax(logits, dim=-1)[len(context_ids) - 1 :]
    return float(scores.gather(-1, torch.tensor(continuation_ids)[:, None]).sum())


def test_every_task_runs_on_its_raw_format(llama, tokenizer, data_dir, isolated_cache):
    run = run_general(llama, tokenizer, GeneralConfig(tasks=list(TASKS), limit=2, data_dir=str(data_dir), safety_dir=str(data_dir / "safety"), batch_size=4, safety_max_tokens=8))
    for task in TASKS:
        metric, direction = HEADLINE[task]
        value = run.scores[task][metric]
        assert math.isfinite(value), task
        assert (0.0 <= value <= 1.0) if direction == "higher" or metric == "over_refusal" else value > 1.0, (task, value)
        assert run.items[task] == 2
        assert run.costs[task].requests > 0
    # Only the formats lm-eval cannot read in place were converted, each once.
    derived = sorted(path.name.split("-")[0] for path in (isolated_cache / "general").glob("*.jsonl"))
    assert derived == sorted(["bbh", "hellaswag", "mmlu", "piqa", "truthfulqa", "wikitext", *SAFETY_TASKS])
    assert set(run.scores["wikitext"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert set(run.scores["gsm8k"]) == {"exact_match", "exact_match_flexible"}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_accuracy_is_the_argmax_of_the_models_own_loglikelihoods(kind, tokenizer, data_dir):
    model = build(kind, len(tokenizer))
    run = run_general(model, tokenizer, GeneralConfig(tasks=["arc_easy"], limit=None, data_dir=str(data_dir)))
    scores = run.scores
    acc, acc_norm = [], []
    for item in ARC_EASY:
        lls = [loglikelihood(model, tokenizer, f"Question: {item['prompt']}\nAnswer:", " " + choice) for choice in item["choices"]]
        assert min(abs(a - b) for i, a in enumerate(lls) for b in lls[i + 1 :]) > 1e-4  # no near ties
        normed = [ll / len(choice) for ll, choice in zip(lls, item["choices"])]
        acc.append(int(np.argmax(lls)) == item["answer_idx"])
        acc_norm.append(int(np.argmax(normed)) == item["answer_idx"])
    assert scores["arc_easy"]["acc"] == pytest.approx(np.mean(acc))
    assert scores["arc_easy"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    # each item's headline value (acc_norm), in item order, and the uniform guesser's score
    assert run.item_scores["arc_easy"] == [float(a) for a in acc_norm]
    assert run.chance["arc_easy"] == pytest.approx(np.mean([1 / len(item["choices"]) for item in ARC_EASY]))


def test_truthfulqa_mc2_is_the_normalised_mass_of_true_answers(llama, tokenizer, data_dir):
    from factedit.evaluation.general.readers import TRUTHFULQA_PRIMER

    run = run_general(llama, tokenizer, GeneralConfig(tasks=["truthfulqa_mc2", "truthfulqa_mc1"], limit=1, data_dir=str(data_dir)))
    scores = run.scores
    assert run.chance["truthfulqa_mc2"] == 0.5  # a uniform model puts half the mass on the two true answers of four
    assert run.chance["truthfulqa_mc1"] == pytest.approx(1 / len(json.loads((data_dir / "truthfulqa/data/mc_task.json").read_text())[0]["mc1_targets"]))
    context = f"{TRUTHFULQA_PRIMER}\n\nQ: What is the capital of Italy 0?\nA:"
    probs = np.exp([loglikelihood(llama, tokenizer, context, " " + answer) for answer in ("Rome.", "It is Rome.", "Paris.", "Africa.")])
    assert scores["truthfulqa_mc2"]["acc"] == pytest.approx(probs[:2].sum() / probs.sum(), rel=1e-4)


def test_repeated_calls_are_identical(llama, tokenizer, data_dir):
    config = GeneralConfig(tasks=["hellaswag", "arc_challenge", "lambada", "wikitext", "mmlu", "gsm8k"], limit=2, num_fewshot=1, data_dir=str(data_dir), batch_size=2)
    assert evaluate_general(llama, tokenizer, config) == evaluate_general(llama, tokenizer, config)


def test_limit_counts_items_and_fewshot_examples_come_from_the_rest(llama, tokenizer, data_dir, isolated_cache):
    run = run_general(llama, tokenizer, GeneralConfig(tasks=["arc_easy"], limit=2, data_dir=str(data_dir)))
    assert run.items["arc_easy"] == 2
    assert run.costs["arc_easy"].requests == len(ARC_EASY[0]["choices"]) + len(ARC_EASY[1]["choices"])

    config = GeneralConfig(tasks=["arc_easy"], limit=None, num_fewshot=1, data_dir=str(data_dir))
    prepared = prepare_local("arc_easy", config, data_dir, isolated_cache / "general")
    assert prepared.config["process_docs"].indices == [0, 1]  # the last item is held back for the example
    assert prepared.config["fewshot_config"]["samples"] == [{"query": "Question: What does Toko Yasuda play?\nAnswer:", "choices": ARC_EASY[2]["choices"], "gold": 0}]
    assert prepared.config["num_fewshot"] == 1


def test_task_limits_override_the_limit_per_task(llama, tokenizer, data_dir, isolated_cache):
    run = run_general(llama, tokenizer, GeneralConfig(tasks=["arc_easy", "piqa"], limit=2, task_limits={"arc_easy": 1}, data_dir=str(data_dir)))
    assert run.items["arc_easy"] == 1 and run.items["piqa"] == 2
    with pytest.raises(UnknownTaskError):
        GeneralConfig(tasks=["piqa"], task_limits={"nope": 1})
    with pytest.raises(ValueError, match="task_limits"):
        GeneralConfig(tasks=["piqa"], task_limits={"piqa": 0})


def test_mmlu_limit_is_a_total_over_subjects_with_same_subject_examples(llama, tokenizer, data_dir, isolated_cache):
    run = run_general(llama, tokenizer, GeneralConfig(tasks=["mmlu"], limit=4, data_dir=str(data_dir)))
    assert run.items["mmlu"] == 4 and run.costs["mmlu"].requests == 16  # not 3 + 3: the limit is not per subject

    config = GeneralConfig(tasks=["mmlu"], limit=4, num_fewshot=2, seed=3, data_dir=str(data_dir))
    prepared = prepare_local("mmlu", config, data_dir, isolated_cache / "general")
    again = prepare_local("mmlu", config, data_dir, isolated_cache / "general")
    assert prepared.config["process_docs"].indices == again.config["process_docs"].indices
    import datasets

    docs = prepared.config["process_docs"](datasets.load_dataset("json", data_files=prepared.config["dataset_kwargs"]["data_files"])["test"])
    assert len(docs) == 4 and {doc["subject"] for doc in docs} == {"astronomy", "virology"}
    for doc in docs:
        text = prepared.config["doc_to_text"](doc)
        other = {"astronomy": "virology", "virology": "astronomy"}[doc["subject"]]
        assert text.startswith(f"The following are multiple choice questions (with answers) about {doc['subject']}.\n\n")
        assert text.count(f"{doc['subject']} dev question") == 2 and other not in text and " test question" in text
        assert text.endswith("\nD. French\nAnswer:")


def test_the_model_and_the_callers_state_are_left_as_they_were(tokenizer, data_dir):
    model = build("llama", len(tokenizer)).train()
    model.model.layers[0].requires_grad_(False)
    model.lm_head.eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    objects = {name: id(parameter) for name, parameter in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    grads = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    configs = (model.config.to_dict(), model.generation_config.to_dict())
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)

    evaluate_general(model, no_pad, GeneralConfig(tasks=["piqa", "lambada", "triviaqa"], limit=2, data_dir=str(data_dir)))

    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert no_pad.pad_token is None
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == grads
    assert {name: id(parameter) for name, parameter in model.named_parameters()} == objects
    assert (model.config.to_dict(), model.generation_config.to_dict()) == configs
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_unknown_task_and_missing_files_are_clear_errors(llama, tokenizer, tmp_path):
    with pytest.raises(UnknownTaskError, match="'hellaswagg'.*supported: mmlu"):
        GeneralConfig(tasks=["hellaswagg"])
    with pytest.raises(MissingDataError) as error:
        evaluate_general(llama, tokenizer, GeneralConfig(tasks=["piqa"], data_dir=str(tmp_path)))
    assert "'piqa'" in str(error.value) and str(tmp_path / "piqa" / "valid.jsonl") in str(error.value)
    assert evaluate_general(llama, tokenizer, GeneralConfig()) == {}


def test_converted_files_are_keyed_by_source_content(llama, tokenizer, tmp_path, isolated_cache):
    root = write_fixture_data(tmp_path / "data")
    config = GeneralConfig(tasks=["hellaswag"], limit=None, data_dir=str(root))
    first = evaluate_general(llama, tokenizer, config)
    assert evaluate_general(llama, tokenizer, config) == first
    assert len(list((isolated_cache / "general").glob("hellaswag-*.jsonl"))) == 1
    raw = root / "hellaswag/hellaswag_val_full.txt.bz2"
    lines = bz2.decompress(raw.read_bytes()).decode().split("\n")
    lines[1] = "1"  # a different gold label for the first item
    raw.write_bytes(bz2.compress("\n".join(lines).encode()))
    evaluate_general(llama, tokenizer, config)
    assert len(list((isolated_cache / "general").glob("hellaswag-*.jsonl"))) == 2


def test_raw_readers(tmp_path, data_dir):
    pages = read_wikitext(data_dir / "wikitext/wikitext-2-raw/wiki.test.raw")
    assert [page["page"].split("\n")[0] for page in pages] == [" = Paris = ", " = Rome = "]
    assert all("\r" not in page["page"] for page in pages) and " = = History = = " in pages[0]["page"]
    docs = read_hellaswag(data_dir / "hellaswag/hellaswag_val_full.txt.bz2")
    assert [doc["gold"] for doc in docs] == [0, 1, 2] and docs[0]["choices"][0] == "located in Paris."


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prefix_scorer_matches_hflm(kind, tokenizer):
    from lm_eval.models.huggingface import HFLM

    model = build(kind, len(tokenizer))
    lm = in_memory_lm(model, tokenizer, batch_size=3)
    assert lm.shared_prefix
    generator = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [generator.randrange(1, len(tokenizer)) for _ in range(n)]

    primer = tokens(40)  # common to every request: run once and shared
    requests = []
    for question in range(5):
        context = primer + tokens(generator.randrange(1, 30))
        requests += [(None, context, tokens(generator.randrange(1, 12))) for _ in range(4)]
        requests += [(None, context, [letter]) for letter in (5, 6, 7)]  # one-token options
    requests.append((None, tokens(2040), tokens(30)))  # truncated from the left
    requests.append((None, [0], tokens(2048)))  # a whole rolling window
    lm.scorer.LOGIT_BUDGET = 512 * len(tokenizer)  # forces chunked tails
    ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    reference = HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)
    for (value, greedy), (expected, expected_greedy) in zip(ours, reference):
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert greedy == expected_greedy


def test_batches_cost_less_than_padding():
    scorer = PrefixScorer.__new__(PrefixScorer)
    scorer.pass_cost, scorer.max_tokens, scorer.cache_bytes_per_token = 10, 1000, 0
    widths = [50, 49, 48, 5, 5, 4, 4, 4]
    batches = scorer._batches(widths, max_rows=16)
    assert batches == [[0, 1, 2], [3, 4, 5, 6, 7]]
    narrow = scorer._batches(widths, max_rows=2)
    assert [i for batch in narrow for i in batch] == list(range(len(widths))) and max(map(len, narrow)) == 2
    scorer.max_tokens = 100  # at most two rows of width 50
    assert max(len(batch) for batch in scorer._batches(widths, max_rows=16) if batch[0] < 3) <= 2
    scorer.max_tokens, scorer.cache_bytes_per_token = 1000, scorer.CACHE_BUDGET // 200  # 200 cached tokens per pass
    assert all(len(batch) * (100 + widths[batch[0]]) <= 200 for batch in scorer._batches(widths, max_rows=16, past=100))


def test_hub_source_uses_lm_eval_standard_names():
    names = hub_task_names(GeneralConfig(tasks=[task for task in TASKS if task not in SAFETY_TASKS], source="hub"))
    with pytest.raises(ValueError, match="advbench.*source='local'"):
        hub_task_names(GeneralConfig(tasks=["advbench"], source="hub"))
    assert names["lambada"] == "lambada_openai" and names["bbh"] == "bbh_zeroshot" and names["mmlu"] == "mmlu"
    assert hub_task_names(GeneralConfig(tasks=["bbh"], source="hub", num_fewshot=3))["bbh"] == "bbh_fewshot"
    with pytest.raises(ValueError, match="source"):
        GeneralConfig(tasks=["mmlu"], source="internet")


@pytest.mark.slow
def test_every_local_file_of_the_shared_folder_is_read(isolated_cache):
    data = default_data_dir()
    sizes = {"mmlu": 14042, "hellaswag": 10042, "piqa": 1838, "truthfulqa_mc1": 817, "wikitext": 62, "bbh": 6511, "arc_easy": 2376}
    for task in TASKS:
        if task == "toxigen":  # its annotated test set is not in the shared folder
            with pytest.raises(MissingDataError, match="skg/toxigen-data"):
                prepare_local(task, GeneralConfig(tasks=[task]), data, isolated_cache / "general")
            continue
        prepared = prepare_local(task, GeneralConfig(tasks=[task], limit=None, num_fewshot=0), data, isolated_cache / "general")
        if task in sizes:
            assert prepared.items == sizes[task], task


@pytest.mark.slow
def test_default_model_on_arc_easy():
    from factedit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    scores = evaluate_general(model, tokenizer, GeneralConfig(tasks=["arc_easy"], limit=100))
    assert scores["arc_easy"]["acc"] == pytest.approx(0.49, abs=0.02)


def test_per_task_shots_and_the_paper_preset(data_dir, isolated_cache):
    config = GeneralConfig(tasks=["mmlu", "arc_easy", "bbh"], num_fewshot=1, fewshot_preset="paper", task_fewshot={"bbh": 2}, data_dir=str(data_dir))
    assert [config.fewshot_of(t) for t in ("mmlu", "gsm8k", "commonsense_qa", "truthfulqa_mc1", "arc_easy", "bbh")] == [5, 8, 7, 0, 1, 2]
    assert prepare_local("mmlu", config, data_dir, isolated_cache / "general").fewshot == 5  # the paper's 5-shot MMLU
    assert prepare_local("arc_easy", config, data_dir, isolated_cache / "general").config["num_fewshot"] == 1  # not in the preset
    with pytest.raises(ValueError, match="per-task shots"):
        run_general(None, None, GeneralConfig(tasks=["mmlu", "arc_easy"], source="hub", fewshot_preset="paper"))
    with pytest.raises(ValueError, match="fewshot_preset"):
        GeneralConfig(fewshot_preset="leaderboard")
    with pytest.raises(UnknownTaskError):
        GeneralConfig(task_fewshot={"mmlu_pro": 5})


def test_a_task_is_one_row_of_the_table():
    """The task names the settings check and ``--help`` list are the table's rows, in its order."""
    from factedit.evaluation import config
    from factedit.evaluation.general import tasks

    assert config.TASKS is tasks.TASKS and tasks.TASKS == tuple(tasks.TASK_TABLE)
    assert set(tasks.SAFETY_TASKS) == {name for name, task in tasks.TASK_TABLE.items() if task.root == "safety"}
    assert tasks.TASKS[:2] == ("mmlu", "gsm8k") and tasks.TASKS[-1] == "toxigen"
