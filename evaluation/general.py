r"""General abilities after editing: standard benchmarks scored on the edited model, in memory.

Editing facts can damage what a model knows and does elsewhere (Gu et al., 2024, "Model Editing
Harms General Abilities of Large Language Models"; Gupta et al., 2024, "Model Editing at Scale
Leads to Gradual and Catastrophic Forgetting"). :func:`evaluate_general` measures that on the
model object it is given (never a copy reloaded from disk) with lm-evaluation-harness as the
engine (Biderman et al., 2024, "Lessons from the Trenches on Reproducible Evaluation of Language
Models"): the model is wrapped in ``lm_eval.models.huggingface.HFLM`` and scored by
``lm_eval.simple_evaluate`` with task configs built here as Python dicts.

Prompts and metrics follow lm-eval's own task definitions (headline metric first):

* ``mmlu``: question, options A-D, "Answer:", letter options; acc.
* ``gsm8k``: "Question: ..\nAnswer:", greedy until "Question:"; exact_match of the "#### n"
  answer (strict), exact_match_flexible (last number).
* ``bbh``: task description, "Q: ..\nA:", greedy direct answer; exact_match.
* ``commonsense_qa``: question, options A-E, letter options; acc.
* ``triviaqa``: "Question: ..\nAnswer:", greedy until a newline, period or comma; exact_match
  against any alias.
* ``truthfulqa_mc1`` / ``_mc2``: the six-question QA primer, then the question; acc (mc2: the
  normalised probability of the true answers).
* ``hellaswag``: context, four endings; acc_norm, acc.
* ``arc_easy`` / ``arc_challenge``: "Question: ..\nAnswer:", answer texts; acc_norm, acc.
* ``piqa``: "Question: goal\nAnswer:", two solutions; acc_norm, acc.
* ``boolq``: passage, "Question: ..?\nAnswer:", no / yes; acc.
* ``lambada``: a passage and its last word; acc (greedy), perplexity.
* ``wikitext``: whole articles, rolling log-likelihood over the model's context length;
  word_perplexity, byte_perplexity, bits_per_byte.

Papers: MMLU (Hendrycks et al., 2021), GSM8K (Cobbe et al., 2021), BIG-Bench Hard (Suzgun et al.,
2023), CommonsenseQA (Talmor et al., 2019), TriviaQA (Joshi et al., 2017), TruthfulQA (Lin et al.,
2022), HellaSwag (Zellers et al., 2019), ARC (Clark et al., 2018), PIQA (Bisk et al., 2020), BoolQ
(Clark et al., 2019), LAMBADA (Paperno et al., 2016), WikiText (Merity et al., 2017).

Data (``source="local"``) comes from the files under ``data_dir`` described in its
``MANIFEST.md``. Files lm-eval can load as they are (JSON lines) are read in place; the others
(MMLU's CSVs, HellaSwag's bz2 text, TruthfulQA's MC JSON, PIQA's separate labels, BBH's JSON and
prompt files, WikiText's raw text) are converted once into JSON lines under
``$FACTEDIT_CACHE/general`` (default ``~/.cache/factedit/general``), named by the sha256 of their
sources. ``source="hub"`` runs lm-eval's standard tasks of the same names instead (needs internet).

Pre- and post-edit numbers are paired: the same items (the first ``limit``; for MMLU and BBH a
fixed sample of ``limit`` over all subjects drawn with ``seed``), the same few-shot examples
(drawn with ``seed`` from a split that is not evaluated), greedy decoding, and the same batches.

Speed. Every multiple-choice option repeats its question, so log-likelihoods are computed by
:class:`PrefixScorer`: one forward pass per distinct context (and one for a prefix common to all
of a task's prompts, such as few-shot examples), whose key/value cache the options then continue
from, with the vocabulary projection only at the positions that are scored. It checks itself
against plain forward passes on first use and otherwise falls back to HFLM's own loop. lm-eval's
environment report (pip and driver queries, seconds per call) and bootstrap standard errors are
skipped.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from factedit.editors.lm import cache_kwargs, cache_of

from .config import GENERAL_SOURCES as SOURCES  # noqa: F401  (where the suite's data comes from)
from .config import TASKS, GeneralConfig, UnknownTaskError, check_tasks  # noqa: F401  (defined with the other run settings)
from factedit.models import cache_dir
from .safety import SAFETY_SETS, RefusalResults, default_safety_dir, load_judge, read_toxigen
from .scoring import uses_chat_template

logger = logging.getLogger(__name__)

HEADLINE: dict[str, tuple[str, str]] = {
    "mmlu": ("acc", "higher"),
    "gsm8k": ("exact_match", "higher"),
    "bbh": ("exact_match", "higher"),
    "commonsense_qa": ("acc", "higher"),
    "triviaqa": ("exact_match", "higher"),
    "truthfulqa_mc1": ("acc", "higher"),
    "truthfulqa_mc2": ("acc", "higher"),
    "hellaswag": ("acc_norm", "higher"),
    "arc_easy": ("acc_norm", "higher"),
    "arc_challenge": ("acc_norm", "higher"),
    "piqa": ("acc_norm", "higher"),
    "boolq": ("acc", "higher"),
    "lambada": ("acc", "higher"),
    "wikitext": ("word_perplexity", "lower"),
    **{name: (metric, "lower" if metric == "over_refusal" else "higher") for name, (_, _, metric) in SAFETY_SETS.items()},
    "toxigen": ("acc", "higher"),
}


class MissingDataError(FileNotFoundError):
    pass


def default_data_dir() -> Path:
    env = os.environ.get("FACTEDIT_GENERAL_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "general"


# -- raw files -> documents ---------------------------------------------------------------------
#
# Every reader returns documents in the schema the prompts below use:
#   multiple choice: {"query", "choices", "gold"} (+ "subject", "description" for MMLU)
#   TruthfulQA:      {"question", "mc1_choices", "mc1_gold", "mc2_choices", "mc2_labels"}
#   generation:      {"query", "target"} or {"query", "answers"} (+ "subtask", "description" for BBH)
#   lambada:         {"context", "continuation"};   wikitext: {"page"}
# Documents with "split": "dev" / "prompt" are few-shot material only, never evaluated.


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _mc_block(question: str, options: Sequence[str], letters: str) -> str:
    """Question followed by lettered options and "Answer:" (the MMLU / CommonsenseQA layout)."""
    lines = [question] + [f"{letter}. {option}" for letter, option in zip(letters, options)]
    return "\n".join(lines) + "\nAnswer:"


def _read_mmlu(test_dir: Path, dev_dir: Path) -> list[dict]:
    """MMLU CSVs with a header row and integer answers; the subject comes from the file name."""
    docs = []
    for split, folder in (("test", test_dir), ("dev", dev_dir)):
        for path in sorted(folder.glob(f"*_{split}.csv")):
            subject = path.name[: -len(f"_{split}.csv")]
            with open(path, encoding="utf-8", newline="") as handle:
                for number, row in enumerate(csv.DictReader(handle), start=2):
                    try:
                        options = [row[f"choice{i}"] for i in range(4)]
                        answer = int(row["answer"])
                    except (KeyError, TypeError, ValueError):
                        raise ValueError(f"{path}: line {number} is not question,choice0..3,answer (integer 0-3)") from None
                    docs.append(
                        {
                            "split": split,
                            "subject": subject,
                            "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.",
                            "query": _mc_block(row["question"].strip(), options, "ABCD"),
                            "choices": ["A", "B", "C", "D"],
                            "gold": answer,
                        }
                    )
    return docs


def _read_hellaswag(path: Path) -> list[dict]:
    """The text form of HellaSwag: six lines per item (context, gold label, four endings)."""
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().replace("\r\n", "\n").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, expected six per item")
    docs = []
    for start in range(0, len(lines), 6):
        query, label, *endings = lines[start : start + 6]
        docs.append({"query": query, "choices": endings, "gold": int(label)})
    return docs


def _read_truthfulqa(path: Path) -> list[dict]:
    """TruthfulQA's mc_task.json: answer -> 0/1 maps; mc1 has exactly one true answer."""
    docs = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        mc1, mc2 = item["mc1_targets"], item["mc2_targets"]
        docs.append(
            {
                "question": item["question"],
                "mc1_choices": list(mc1),
                "mc1_gold": list(mc1.values()).index(1),
                "mc2_choices": list(mc2),
                "mc2_labels": [int(v) for v in mc2.values()],
            }
        )
    return docs


def _read_piqa(data: Path, labels: Path) -> list[dict]:
    items = _read_jsonl(data)
    golds = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(items) != len(golds):
        raise ValueError(f"{data} has {len(items)} items but {labels} has {len(golds)} labels")
    return [{"query": f"Question: {item['goal']}\nAnswer:", "choices": [item["sol1"], item["sol2"]], "gold": int(gold)} for item, gold in zip(items, golds)]


_BBH_ANSWER = re.compile(r"So the answer is (.*?)\.?\s*$", re.S)


def _read_bbh(task_dir: Path, prompt_dir: Path) -> list[dict]:
    """BIG-Bench Hard: ``<task>.json`` examples plus the task description and the three exemplars
    of ``<task>.txt`` (their chain of thought dropped: answer-only prompting, as lm-eval's
    ``bbh_fewshot``)."""
    docs = []
    for path in sorted(task_dir.glob("*.json")):
        subtask = path.stem
        prompt_path = prompt_dir / f"{subtask}.txt"
        text = prompt_path.read_text(encoding="utf-8").replace("\r\n", "\n")
        body = text.split("-----\n", 1)[-1]
        description, *exemplars = body.split("\n\nQ: ")
        for exemplar in exemplars:
            question, _, reasoning = exemplar.partition("\nA: ")
            found = _BBH_ANSWER.search(reasoning.strip())
            if found is None:
                raise ValueError(f"{prompt_path}: an exemplar has no 'So the answer is ...'")
            docs.append({"split": "prompt", "subtask": subtask, "description": description.strip(), "query": f"Q: {question}\nA:", "target": found.group(1)})
        for example in json.loads(path.read_text(encoding="utf-8"))["examples"]:
            docs.append({"split": "test", "subtask": subtask, "description": description.strip(), "query": f"Q: {example['input']}\nA:", "target": example["target"]})
    return docs


_WIKI_TITLE = re.compile(r" = [^=].* = ")


def _read_wikitext(path: Path) -> list[dict]:
    """WikiText-2 raw test text (CRLF line ends) split into articles at their level-1 titles."""
    lines = path.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n")
    pages: list[list[str]] = []
    for line in lines:
        if _WIKI_TITLE.fullmatch(line) or not pages:
            pages.append([])
        if line.strip():
            pages[-1].append(line)
    return [{"page": "\n".join(page) + "\n"} for page in pages if page]


# Normalisers for the JSON-lines files lm-eval reads in place.


def _norm_arc_easy(row: dict) -> dict:
    return {"query": f"Question: {row['prompt']}\nAnswer:", "choices": list(row["choices"]), "gold": int(row["answer_idx"])}


def _norm_arc_challenge(row: dict) -> dict:
    labels = [option["label"] for option in row["options"]]
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": [option["text"] for option in row["options"]], "gold": labels.index(row["answer"])}


def _norm_commonsense_qa(row: dict) -> dict:
    question = row["question"]
    labels = [choice["label"] for choice in question["choices"]]
    texts = [choice["text"] for choice in question["choices"]]
    return {"query": "Question: " + _mc_block(question["stem"].strip(), texts, labels), "choices": labels, "gold": labels.index(row["answerKey"])}


def _norm_boolq(row: dict) -> dict:
    passage, question = row["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
    return {"query": f"{passage}\nQuestion: {question}\nAnswer:", "choices": list(row["choices"]), "gold": int(row["gold"])}


def _norm_triviaqa(row: dict) -> dict:
    answers = [row["answer"]] + [alias for alias in row["aliases"] if alias != row["answer"]]
    return {"query": row["context"], "answers": answers}


def _norm_gsm8k(row: dict) -> dict:
    return {"query": f"Question: {row['question']}\nAnswer:", "target": row["answer"]}


def _norm_lambada(row: dict) -> dict:
    return {"context": row["context"], "continuation": row["continuation"]}


# -- prompts and metrics (lm-eval task config pieces) --------------------------------------------

_TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _truthfulqa_text(doc: dict) -> str:
    return f"{_TRUTHFULQA_PRIMER}\n\nQ: {doc['question']}\nA:"


def _truthfulqa_mc2(doc: dict, results: list) -> dict:
    """Normalised probability mass of the true answers (TruthfulQA's MC2)."""
    lls = np.array([ll for ll, _ in results], dtype=np.float64)
    probs = np.exp(lls - lls.max())
    labels = np.array(doc["mc2_labels"]) == 1
    return {"acc": float(probs[labels].sum() / probs.sum())}


_WIKI_DETOKENIZE = (
    ("s '", "s'"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
)
_WIKI_BRACKETS = (
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
)
_WIKI_AFTER = (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"))


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText's tokenisation (spaced punctuation, ``@-@``), as lm-eval's wikitext task does."""
    for old, new in _WIKI_DETOKENIZE:
        page = page.replace(old, new)
    for pattern, replacement in _WIKI_BRACKETS:
        page = pattern.sub(replacement, page)
    for old, new in _WIKI_AFTER:
        page = page.replace(old, new)
    return page


def _wikitext_target(doc: dict) -> str:
    return wikitext_detokenize(doc["page"])


def _wikitext_results(doc: dict, results: list) -> dict:
    """Per-article log-likelihood with the word and byte counts of the original (tokenised) text."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}


def _metric(name: str, aggregation: str = "mean", higher: bool = True, **options: Any) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher, **options}


_ACC = [_metric("acc")]
_ACC_NORM = [_metric("acc"), _metric("acc_norm")]
_MC = {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold"}
_MC_METRICS = {"acc,none": "acc"}
_MC_NORM_METRICS = {"acc,none": "acc", "acc_norm,none": "acc_norm"}

_GSM8K = {
    "output_type": "generate_until",
    "doc_to_text": "query",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
    "metric_list": [_metric("exact_match", ignore_case=True, ignore_punctuation=False, regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])],
    "filter_list": [
        {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]},
        {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"}, {"function": "take_first"}]},
    ],
}
_TRIVIAQA = {
    "output_type": "generate_until",
    "doc_to_text": "query",
    "doc_to_target": "answers",
    "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0},
    "filter_list": [{"name": "remove_whitespace", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [_metric("exact_match", ignore_case=True, ignore_punctuation=True)],
}
# Direct answers (lm-eval's bbh_zeroshot / bbh_fewshot): the answer is the text before the next
# question or blank line; the longest gold answer (word_sorting) is about 50 tokens.
_BBH = {
    "output_type": "generate_until",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["</s>", "Q:", "<|im_end|>", "\n\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 64},
    "filter_list": [{"name": "strict-match", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [_metric("exact_match", ignore_case=True, regexes_to_ignore=["\\.$", ",", "\n", "\\\\", '"'])],
}


@dataclass(frozen=True)
class _Task:
    """How one benchmark is read, sampled and prompted."""

    files: tuple[str, ...]  # relative to the data folder; a folder must hold at least one file
    read: Callable[..., list[dict]] | None  # raw files -> documents; None: the JSONL file is read in place
    prompt: dict[str, Any]  # lm-eval task config: prompt, output type and metrics
    metrics: dict[str, str]  # lm-eval result key -> reported metric name
    hub: str  # lm-eval's standard task (or group) name
    normalize: Callable[[dict], dict] | None = None  # row of a file read in place -> document
    sample: str = "first"  # "first": the first `limit` items; "seeded": a fixed sample over all subjects
    fewshot: str = "pool"  # "pool": items after the evaluated ones; "group": per-subject material; "none"
    group: str | None = None  # the document field naming the subject (MMLU, BBH)
    root: str = "general"  # the folder ``files`` are in: the general data or the safety sets
    hint: str = ""  # added to the error when the files are missing


_SPECS: dict[str, _Task] = {
    "mmlu": _Task(
        files=("mmlu/data/test", "mmlu/data/dev"),
        read=_read_mmlu,
        prompt={**_MC, "metric_list": _ACC},
        metrics=_MC_METRICS,
        hub="mmlu",
        sample="seeded",
        fewshot="group",
        group="subject",
    ),
    "gsm8k": _Task(files=("gsm8k/test.jsonl",), read=None, normalize=_norm_gsm8k, prompt=_GSM8K, metrics={"exact_match,strict-match": "exact_match", "exact_match,flexible-extract": "exact_match_flexible"}, hub="gsm8k"),
    "bbh": _Task(
        files=("bbh/bbh", "bbh/cot-prompts"),
        read=_read_bbh,
        prompt=_BBH,
        metrics={"exact_match,strict-match": "exact_match"},
        hub="bbh_zeroshot",
        sample="seeded",
        fewshot="group",
        group="subtask",
    ),
    "commonsense_qa": _Task(files=("commonsenseqa/dev_rand_split.jsonl",), read=None, normalize=_norm_commonsense_qa, prompt={**_MC, "metric_list": _ACC}, metrics=_MC_METRICS, hub="commonsense_qa"),
    "triviaqa": _Task(files=("triviaqa/triviaqa_sm_sub.jsonl",), read=None, normalize=_norm_triviaqa, prompt=_TRIVIAQA, metrics={"exact_match,remove_whitespace": "exact_match"}, hub="triviaqa"),
    "truthfulqa_mc1": _Task(
        files=("truthfulqa/data/mc_task.json",),
        read=_read_truthfulqa,
        prompt={"output_type": "multiple_choice", "doc_to_text": _truthfulqa_text, "doc_to_choice": "mc1_choices", "doc_to_target": "mc1_gold", "metric_list": _ACC},
        metrics=_MC_METRICS,
        hub="truthfulqa_mc1",
        fewshot="none",
    ),
    "truthfulqa_mc2": _Task(
        files=("truthfulqa/data/mc_task.json",),
        read=_read_truthfulqa,
        prompt={
            "output_type": "multiple_choice",
            "doc_to_text": _truthfulqa_text,
            "doc_to_choice": "mc2_choices",
            "doc_to_target": 0,
            "process_results": _truthfulqa_mc2,
            "metric_list": _ACC,
        },
        metrics=_MC_METRICS,
        hub="truthfulqa_mc2",
        fewshot="none",
    ),
    "hellaswag": _Task(files=("hellaswag/hellaswag_val_full.txt.bz2",), read=_read_hellaswag, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="hellaswag"),
    "arc_easy": _Task(files=("arc/arc_easy_test.jsonl",), read=None, normalize=_norm_arc_easy, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="arc_easy"),
    "arc_challenge": _Task(files=("arc/arc_challenge_test.jsonl",), read=None, normalize=_norm_arc_challenge, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="arc_challenge"),
    "piqa": _Task(files=("piqa/valid.jsonl", "piqa/valid-labels.lst"), read=_read_piqa, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="piqa"),
    "boolq": _Task(files=("boolq/boolq.jsonl",), read=None, normalize=_norm_boolq, prompt={**_MC, "metric_list": _ACC}, metrics=_MC_METRICS, hub="boolq"),
    "lambada": _Task(
        files=("lambada/lambada_openai.jsonl",),
        read=None,
        normalize=_norm_lambada,
        prompt={
            "output_type": "loglikelihood",
            "doc_to_text": "context",
            "doc_to_target": lambda doc: " " + doc["continuation"],
            "metric_list": [_metric("perplexity", "perplexity", False), _metric("acc")],
        },
        metrics={"acc,none": "acc", "perplexity,none": "perplexity"},
        hub="lambada_openai",
        fewshot="none",
    ),
    "wikitext": _Task(
        files=("wikitext/wikitext-2-raw/wiki.test.raw",),
        read=_read_wikitext,
        prompt={
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": _wikitext_target,
            "process_results": _wikitext_results,
            "metric_list": [
                _metric("word_perplexity", "weighted_perplexity", False),
                _metric("byte_perplexity", "weighted_perplexity", False),
                _metric("bits_per_byte", "bits_per_byte", False),
            ],
        },
        metrics={"word_perplexity,none": "word_perplexity", "byte_perplexity,none": "byte_perplexity", "bits_per_byte,none": "bits_per_byte"},
        hub="wikitext",
        fewshot="none",
    ),
}
# The safety sets (evaluation.safety): a greedy answer per request, judged when the task is prepared.
_SAFETY_PROMPT = {
    "output_type": "generate_until",
    "doc_to_text": "query",
    "doc_to_target": lambda doc: "",
    "generation_kwargs": {"until": ["</s>", "<|im_end|>", "<|endoftext|>"], "do_sample": False, "temperature": 0.0},
}
for _name, (_file, _read, _metric_name) in SAFETY_SETS.items():
    _SPECS[_name] = _Task(
        files=(_file,), read=_read, prompt=_SAFETY_PROMPT, metrics={f"{_metric_name},none": _metric_name}, hub="", fewshot="none", root="safety"
    )
_SPECS["toxigen"] = _Task(
    files=("toxigen/annotated_test.csv",),
    read=read_toxigen,
    prompt={**_MC, "metric_list": _ACC_NORM},
    metrics=_MC_NORM_METRICS,
    hub="toxigen",
    fewshot="none",
    root="safety",
    hint=" (ToxiGen's 940 annotated test statements are not in the shared folder: save the 'annotated' test split of skg/toxigen-data there as that file, or use source='hub')",
)
assert set(_SPECS) == set(TASKS) == set(HEADLINE)

_FORMAT_VERSION = "2"  # part of every derived file's key: bump when a reader's output changes


def _required_paths(name: str, data_dir: Path, safety_dir: Path | None = None) -> list[Path]:
    if _SPECS[name].root == "safety":
        data_dir = safety_dir or default_safety_dir(data_dir)
    paths = []
    for relative in _SPECS[name].files:
        path = data_dir / relative
        present = path.is_file() or (path.is_dir() and any(child.is_file() for child in path.iterdir()))
        if not present:
            raise MissingDataError(
                f"general task {name!r} needs {path}, which is missing. Point GeneralConfig.data_dir (or "
                f"$FACTEDIT_GENERAL_DATA) at the benchmark folder, or use source='hub'"
                if _SPECS[name].root == "general"
                else f"safety task {name!r} needs {path}, which is missing{_SPECS[name].hint}. Point GeneralConfig.safety_dir (or "
                f"$FACTEDIT_SAFETY_DATA) at the folder of the safety sets"
            )
        paths.append(path)
    return paths


def _sha256_of(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256(_FORMAT_VERSION.encode())
    for path in paths:
        files = sorted(child for child in path.rglob("*") if child.is_file()) if path.is_dir() else [path]
        for file in files:
            label = file.relative_to(path.parent).as_posix()
            digest.update(label.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _derived_file(name: str, paths: list[Path], read: Callable[..., list[dict]], cache: Path) -> tuple[Path, list[dict]]:
    """The JSONL form of a task's raw files, written once per distinct source content."""
    stem = _SPECS[name].files[0].split("/")[0]  # truthfulqa_mc1 and _mc2 share one file
    target = cache / f"{stem}-{_sha256_of(paths)[:16]}.jsonl"
    if target.is_file():
        return target, _read_jsonl(target)
    docs = read(*paths)
    if not docs:
        raise ValueError(f"general task {name!r}: no items found in {', '.join(map(str, paths))}")
    cache.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cache, prefix=target.name, suffix=".tmp", delete=False)
    with handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(handle.name, target)
    logger.info("general: wrote %s (%d documents) from %s", target, len(docs), ", ".join(map(str, paths)))
    return target, docs


class _Subset:
    """``process_docs`` for lm-eval: the evaluated rows, normalised, as an in-memory dataset."""

    def __init__(self, indices: list[int], normalize: Callable[[dict], dict] | None) -> None:
        self.indices = indices
        self.normalize = normalize or (lambda row: row)

    def __call__(self, dataset):
        import datasets

        return datasets.Dataset.from_list([self.normalize(dataset[i]) for i in self.indices])


@dataclass
class _Prepared:
    config: dict[str, Any]
    metrics: dict[str, str]
    items: int
    fewshot: int


def _rng(config: GeneralConfig, name: str, purpose: str) -> random.Random:
    return random.Random(f"{config.seed}:{name}:{purpose}")


def _prepare_local(name: str, config: GeneralConfig, data_dir: Path, cache: Path) -> _Prepared:
    """An lm-eval task config for ``name`` over the local files: items, few-shot examples, prompt."""
    spec = _SPECS[name]
    paths = _required_paths(name, data_dir, Path(config.safety_dir).expanduser() if config.safety_dir else None)
    if spec.read is None:
        data_file, rows = paths[0], _read_jsonl(paths[0])
    else:
        data_file, rows = _derived_file(name, paths, spec.read, cache)
    normalize = spec.normalize or (lambda row: row)
    candidates = [i for i, row in enumerate(rows) if row.get("split", "test") == "test"]
    shots = config.fewshot_of(name)
    k = shots if spec.fewshot != "none" else 0
    if shots and spec.fewshot == "none":
        logger.info("general: %s does not take few-shot examples; num_fewshot=%d ignored", name, shots)
    if not candidates:
        raise ValueError(f"general task {name!r}: {data_file} holds no items to evaluate")

    limit = config.limit_of(name)
    n = len(candidates) if limit is None else min(limit, len(candidates))
    fewshot_docs: list[dict] = []
    prompt = dict(spec.prompt)
    if spec.sample == "first":
        if spec.fewshot == "pool" and k:
            # Few-shot examples come from the items after the evaluated ones.
            n = min(n, len(candidates) - k)
            if n < 1:
                raise ValueError(f"general task {name!r}: {len(candidates)} items cannot give {k} few-shot examples and an item to evaluate")
            pool = candidates[n:]
            fewshot_docs = [normalize(rows[i]) for i in _rng(config, name, "fewshot").sample(pool, k)]
        indices = candidates[:n]
    else:
        indices = sorted(_rng(config, name, "items").sample(candidates, n))

    if spec.fewshot == "group":
        prompt["doc_to_text"] = _grouped_prompt(name, spec, rows, k, _rng(config, name, "fewshot"))
    if name in SAFETY_SETS:  # a refusal judged on a greedy answer
        metric = HEADLINE[name][0]
        prompt["generation_kwargs"] = {**prompt["generation_kwargs"], "max_gen_toks": config.safety_max_tokens}
        prompt["process_results"] = RefusalResults(load_judge(config.refusal_judge), metric)
        prompt["metric_list"] = [_metric(metric, higher=HEADLINE[name][1] == "higher")]
    prompt.update(
        task=name,
        dataset_path="json",
        dataset_kwargs={"data_files": {"test": str(data_file)}, "cache_dir": str(cache / "hf")},
        test_split="test",
        process_docs=_Subset(indices, spec.normalize),
        num_fewshot=len(fewshot_docs),
    )
    if fewshot_docs:
        prompt["fewshot_config"] = {"sampler": "first_n", "samples": fewshot_docs}
    return _Prepared(config=prompt, metrics=spec.metrics, items=len(indices), fewshot=k)


class _GroupedPrompt:
    """``doc_to_text`` for MMLU and BBH: a per-subject header and fixed per-subject examples."""

    def __init__(self, prefixes: dict[str, str], group: str) -> None:
        self.prefixes = prefixes
        self.group = group

    def __call__(self, doc: dict) -> str:
        return self.prefixes[doc[self.group]] + doc["query"]


def _answer(doc: dict) -> str:
    """The answer text of a few-shot example: its target, or its gold option."""
    return doc["target"] if "target" in doc else doc["choices"][doc["gold"]]


def _grouped_prompt(name: str, spec: _Task, rows: list[dict], k: int, rng: random.Random) -> _GroupedPrompt:
    """Per subject: its description, then ``k`` of its examples (drawn with ``rng``, kept in file order)."""
    material: dict[str, list[dict]] = defaultdict(list)
    descriptions: dict[str, str] = {}
    for row in rows:
        descriptions.setdefault(row[spec.group], row.get("description") or "")
        if row.get("split") in ("dev", "prompt"):
            material[row[spec.group]].append(row)
    prefixes = {}
    for group in sorted(descriptions):
        examples = material[group]
        if k > len(examples):
            raise ValueError(f"general task {name!r}: {group} has {len(examples)} few-shot examples, num_fewshot={k} asks for more")
        chosen = [examples[i] for i in sorted(rng.sample(range(len(examples)), k))]
        header = descriptions[group] + "\n\n" if descriptions.get(group) else ""
        prefixes[group] = header + "".join(f"{ex['query']} {_answer(ex)}\n\n" for ex in chosen)
    return _GroupedPrompt(prefixes, spec.group)


def hub_task_names(config: GeneralConfig) -> dict[str, str]:
    """lm-eval's standard task names for ``config.tasks`` (``source="hub"``)."""
    names = {}
    for name in config.tasks:
        if not _SPECS[name].hub:
            raise ValueError(f"general task {name!r} has no lm-eval standard task; use source='local'")
        names[name] = _SPECS[name].hub
        if name == "bbh" and config.fewshot_of(name):
            names[name] = "bbh_fewshot"
    return names


# -- log-likelihoods with shared prefixes --------------------------------------------------------


class _Unsupported(Exception):
    pass


def _take_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new key/value cache holding ``rows`` of ``cache`` (rows may repeat)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise _Unsupported(f"cache of type {type(cache).__name__} with layers {sorted({type(layer).__name__ for layer in layers or []})}")
    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in layers])


class PrefixScorer:
    """Summed log-probabilities (and greedy-match flags) of continuations given contexts.

    For a request ``(context, continuation)`` the model reads ``(context + continuation)[:-1]``
    (left-truncated to ``max_length``) and the continuation's tokens are scored, as in HFLM. Here
    that input is split at the position that predicts the first continuation token:

    1. one forward pass per distinct *prefix* (the input up to and including that position),
       batched and right-padded, with the vocabulary projection at that position only
       (``logits_to_keep``). A prefix common to all prompts (few-shot examples, a fixed primer) is
       run once beforehand and its key/value cache shared;
    2. the rest of each continuation (its *tail*) runs on its prefix's key/value cache, projected
       only at real (not padding) positions, in chunks that bound the logits held at once.
       Requests that differ only in their last token (one-token options " A" / " B") share all
       forward passes.

    Batches are cut from the length-sorted prefixes (tails) where padding would cost more than
    another forward pass (``pass_cost`` tokens), within ``batch_size`` rows (tails: four times
    as many), ``batch_size * 256`` tokens and ``CACHE_BUDGET`` bytes of key/value cache.
    """

    MIN_SHARED = 16  # tokens: a common prefix shorter than this is not worth a separate pass
    LOGIT_BUDGET = 1 << 26  # logits held at once (256 MiB in float32)
    CACHE_BUDGET = 1 << 30  # bytes of key/value cache per forward pass

    def __init__(self, model: torch.nn.Module, max_length: int, batch_size: int, pad_id: int = 0) -> None:
        self.model = model
        self.max_length = max_length
        self.rows = max(1, batch_size)
        self.max_tokens = self.rows * 256
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        # The fixed cost of one forward pass, in tokens: a few dozen on a CPU, far more on a GPU.
        self.pass_cost = 64 if self.device.type == "cpu" else 1024
        self.tokens = 0  # real (not padding) tokens fed to the model so far
        self.cache_bytes_per_token = 0  # per sequence, measured on the first cache seen
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab = int(head.weight.shape[0]) if head is not None else 1 << 17

    def _plan(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
        """Distinct prefixes, each request's (prefix, first target), and the distinct (prefix, tail)
        rows with the requests scored on them (their remaining targets)."""
        prefix_ids: dict[tuple[int, ...], int] = {}
        row_ids: dict[tuple[int, tuple[int, ...]], int] = {}
        firsts: list[tuple[int, int]] = []
        rows: list[tuple[int, tuple[int, ...]]] = []
        on_row: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            continuation = list(continuation)
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens: must be 1 to max_length={self.max_length}")
            inputs = (list(context) + continuation)[-(self.max_length + 1) :][:-1]
            cut = len(inputs) - len(continuation) + 1
            if cut < 1:
                raise ValueError("a request needs at least one context token")
            pid = prefix_ids.setdefault(tuple(inputs[:cut]), len(prefix_ids))
            firsts.append((pid, continuation[0]))
            if len(continuation) > 1:
                key = (pid, tuple(inputs[cut:]))
                if key not in row_ids:
                    row_ids[key] = len(rows)
                    rows.append(key)
                on_row[row_ids[key]].append((i, continuation[1:]))
        return list(prefix_ids), firsts, rows, on_row

    @torch.inference_mode()
    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        prefixes, firsts, rows, on_row = self._plan(pairs)
        self._logprob = [0.0] * len(pairs)
        self._greedy = [True] * len(pairs)
        by_prefix: dict[int, list[int]] = defaultdict(list)
        for i, (pid, _) in enumerate(firsts):
            by_prefix[pid].append(i)
        rows_of: dict[int, list[int]] = defaultdict(list)
        for rid, (pid, _) in enumerate(rows):
            rows_of[pid].append(rid)

        shared = self._common_length(prefixes)
        base = None
        if shared:
            base = cache_of(self.model(input_ids=self._tensor([list(prefixes[0][:shared])]), use_cache=True))
            self._measure(base)
            self.tokens += shared

        order = sorted(range(len(prefixes)), key=lambda pid: (-len(prefixes[pid]), pid))
        for batch in self._batches([len(prefixes[pid]) - shared for pid in order], self.rows, past=shared):
            batch = [order[k] for k in batch]
            rests = [list(prefixes[pid][shared:]) for pid in batch]
            width = max(map(len, rests))
            lengths = torch.tensor([len(rest) for rest in rests], device=self.device)
            needs_cache = any(rows_of[pid] for pid in batch)
            out = self.model(
                input_ids=self._tensor([rest + [self.pad_id] * (width - len(rest)) for rest in rests]),
                position_ids=(shared + torch.arange(width, device=self.device)).expand(len(batch), width),
                **cache_kwargs(self.model, _take_rows(base, torch.zeros(len(batch), dtype=torch.long, device=self.device)) if base is not None else None),
                use_cache=needs_cache,
                logits_to_keep=(lengths - 1)[:, None],
            )
            self.tokens += int(lengths.sum())
            logits = out.logits.reshape(len(batch), -1)
            for row, pid in enumerate(batch):
                for i in by_prefix[pid]:
                    self._add(i, logits[row : row + 1], [firsts[i][1]])
                if progress is not None:
                    progress(len(by_prefix[pid]) - sum(len(on_row[rid]) for rid in rows_of[pid]))
            if needs_cache:
                self._measure(cache_of(out))
                mask = torch.ones(len(batch), shared + width, dtype=torch.long, device=self.device)
                mask[:, shared:] = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
                self._tails(cache_of(out), mask, shared + lengths, batch, rows, rows_of, on_row, progress)
            del out
        return list(zip(self._logprob, self._greedy))

    def _common_length(self, prefixes: list[tuple[int, ...]]) -> int:
        """Length of the prefix common to all prefixes (each keeps at least one token of its own)."""
        if len(prefixes) < 2:
            return 0
        limit = min(len(p) for p in prefixes) - 1
        first = prefixes[0]
        shared = 0
        while shared < limit and all(p[shared] == first[shared] for p in prefixes):
            shared += 1
        return shared if shared >= self.MIN_SHARED else 0

    def _tails(self, cache, mask, ends, batch, rows, rows_of, on_row, progress) -> None:
        """Score the continuation tails of the prefixes in ``batch``, continuing from their cache."""
        slot = {pid: index for index, pid in enumerate(batch)}
        tails = sorted((rid for pid in batch for rid in rows_of[pid]), key=lambda rid: (-len(rows[rid][1]), rid))
        for group in self._batches([len(rows[rid][1]) for rid in tails], 4 * self.rows, past=mask.shape[1]):
            group = [tails[k] for k in group]
            select = torch.tensor([slot[rows[rid][0]] for rid in group], device=self.device)
            lengths = [len(rows[rid][1]) for rid in group]
            width = lengths[0]
            ids = self._tensor([list(rows[rid][1]) + [self.pad_id] * (width - len(rows[rid][1])) for rid in group])
            real = torch.arange(width, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
            attention = torch.cat([mask.index_select(0, select), real.long()], dim=1)
            # Padding positions are clamped so that absolute position tables are never overrun.
            positions = (ends.index_select(0, select)[:, None] + torch.arange(width, device=self.device)[None, :]).clamp(max=self.max_length - 1)
            cache_rows = _take_rows(cache, select)
            past = mask.shape[1]
            step = max(1, self.LOGIT_BUDGET // (len(group) * self.vocab))  # bounds the logits held at once
            for start in range(0, width, step):
                stop = min(width, start + step)
                keep = real[:, start:stop]
                out = self.model(
                    input_ids=ids[:, start:stop],
                    attention_mask=attention[:, : past + stop],
                    position_ids=positions[:, start:stop],
                    **cache_kwargs(self.model, cache_rows),
                    use_cache=stop < width,
                    logits_to_keep=keep,
                )
                logits = out.logits.reshape(-1, out.logits.shape[-1])  # the kept positions, row by row
                offset = 0
                for row, rid in enumerate(group):
                    span = int(keep[row].sum())
                    for i, targets in on_row[rid]:
                        self._add(i, logits[offset : offset + span], targets[start : start + span])
                    offset += span
                del out, logits
            self.tokens += sum(lengths)
            if progress is not None:
                progress(sum(len(on_row[rid]) for rid in group))

    def _add(self, i: int, logits: torch.Tensor, targets: Sequence[int]) -> None:
        """Add the log-probabilities of ``targets`` under ``logits`` (one row per target) to request ``i``."""
        if not len(targets):
            return
        logits = logits.float()
        wanted = torch.tensor(targets, device=logits.device)
        chosen = logits.gather(-1, wanted[:, None])[:, 0]
        self._logprob[i] += float((chosen - torch.logsumexp(logits, dim=-1)).sum())
        self._greedy[i] = self._greedy[i] and bool((logits.argmax(dim=-1) == wanted).all())

    def _measure(self, cache: Any) -> None:
        if not self.cache_bytes_per_token:
            layers = cache.layers
            self.cache_bytes_per_token = sum(
                (layer.keys.shape[1] * layer.keys.shape[-1] + layer.values.shape[1] * layer.values.shape[-1]) * layer.keys.element_size() for layer in layers
            )

    def _batches(self, widths: list[int], max_rows: int, past: int = 0) -> list[list[int]]:
        """Cut positions ``0..n-1`` (widths falling) into consecutive batches of least total cost:
        ``pass_cost`` per batch plus its padded size, within ``max_rows``, ``max_tokens`` and the
        cache budget (``past`` cached tokens per row come on top of the widths)."""
        n = len(widths)
        best = [0.0] + [math.inf] * n
        start_of = [0] * (n + 1)
        for stop in range(1, n + 1):
            for start in range(stop - 1, max(-1, stop - 1 - max_rows), -1):
                count = stop - start
                padded = count * max(1, widths[start])
                cached = count * (past + widths[start]) * self.cache_bytes_per_token
                if count > 1 and (padded > self.max_tokens or cached > self.CACHE_BUDGET):
                    break
                cost = best[start] + self.pass_cost + padded
                if cost < best[stop]:
                    best[stop], start_of[stop] = cost, start
        batches = []
        stop = n
        while stop > 0:
            batches.append(list(range(start_of[stop], stop)))
            stop = start_of[stop]
        return batches[::-1]

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def check(self) -> bool:
        """Compare with plain forward passes on random requests; False if this model needs HFLM's loop."""
        generator = torch.Generator().manual_seed(0)
        high = max(2, min(self.vocab, 1000))

        def tokens(n: int) -> list[int]:
            return torch.randint(1, high, (n,), generator=generator).tolist()

        common = tokens(self.MIN_SHARED + 2)
        pairs = [
            (common + tokens(3), tokens(3)),
            (common + tokens(3), tokens(1)),
            (common + tokens(1), tokens(4)),
            (common + tokens(6), tokens(2)),
        ]
        pairs.append((pairs[0][0], pairs[0][1][:2] + tokens(1)))
        before = self.tokens
        try:
            got = self(pairs)
        except Exception as err:  # any failure of the cache path means: use HFLM's loop
            logger.info("general: shared-prefix scoring unavailable for this model (%s: %s); using HFLM's loop", type(err).__name__, err)
            return False
        finally:
            self.tokens = before
        tolerance = 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 5e-2
        # The reference: one plain forward pass over all requests, right-padded (causal attention
        # never looks at the padding that follows a sequence).
        inputs = [list(context) + list(continuation)[:-1] for context, continuation in pairs]
        width = max(map(len, inputs))
        with torch.inference_mode():
            logits = self.model(input_ids=self._tensor([ids + [self.pad_id] * (width - len(ids)) for ids in inputs])).logits.float()
        scores = torch.log_softmax(logits, dim=-1)
        for row, ((context, continuation), (value, _)) in enumerate(zip(pairs, got)):
            targets = torch.tensor(continuation, device=self.device)
            positions = torch.arange(len(context) - 1, len(inputs[row]), device=self.device)
            expected = float(scores[row, positions].gather(-1, targets[:, None]).sum())
            if not math.isclose(value, expected, rel_tol=tolerance, abs_tol=tolerance * len(continuation)):
                logger.info("general: shared-prefix scoring disagrees with plain forward passes (%.5f vs %.5f); using HFLM's loop", value, expected)
                return False
        return True


# -- the lm-eval model wrapper -------------------------------------------------------------------


@dataclass
class TaskCost:
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _in_memory_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int):
    """An HFLM over ``model`` as it is in memory, with per-task costs and shared-prefix scoring."""
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        def __init__(self) -> None:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            self.costs: dict[str, TaskCost] = defaultdict(TaskCost)
            self.scorer = PrefixScorer(model, self.max_length, batch_size, pad_id=self.tokenizer.pad_token_id or 0)
            self.shared_prefix = self.backend == "causal" and self.scorer.check()
            self._task, self._progress = None, True

        def _per_task(self, method, requests, disable_tqdm, inner_progress=False):
            by_task: dict[str, list[int]] = defaultdict(list)
            for index, request in enumerate(requests):
                by_task[request.task_name].append(index)
            answers: list[Any] = [None] * len(requests)
            for task, indices in by_task.items():
                self._task, self._progress = task, not disable_tqdm
                tokens = self.scorer.tokens
                tick = time.perf_counter()
                results = method([requests[i] for i in indices], disable_tqdm=disable_tqdm or not inner_progress)
                cost = self.costs[task]
                cost.seconds += time.perf_counter() - tick
                cost.requests += len(indices)
                cost.tokens += self.scorer.tokens - tokens
                for index, result in zip(indices, results):
                    answers[index] = result
            return answers

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._per_task(super().loglikelihood, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._per_task(super().generate_until, requests, disable_tqdm, inner_progress=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if not self.shared_prefix:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            from tqdm.auto import tqdm

            with tqdm(total=len(requests), disable=not self._progress, desc=f"{self._task or 'scoring'}: log-likelihoods") as bar:
                return self.scorer([(context, continuation) for _, context, continuation in requests], progress=bar.update)

    return InMemoryLM()


# -- keeping the caller's state --------------------------------------------------------------------


@contextlib.contextmanager
def _model_untouched(model: torch.nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag, every parameter's requires_grad and the parameter and
    buffer objects themselves (lm-eval calls ``eval()`` and ``tie_weights()`` on the model)."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    slots = [(module, kind, name, value) for module in model.modules() for kind in ("_parameters", "_buffers") for name, value in getattr(module, kind).items()]
    try:
        yield
    finally:
        for module, kind, name, value in slots:
            if getattr(module, kind).get(name) is not value:
                getattr(module, kind)[name] = value
        for parameter, flag in grads:
            parameter.requires_grad_(flag)
        for module, flag in modes:
            module.training = flag


@contextlib.contextmanager
def _random_state_untouched() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators; give the caller theirs back."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _without_environment_report() -> Iterator[None]:
    """``simple_evaluate`` collects an environment report (pip, compilers, drivers) for its result
    file, seconds of subprocesses per call; nothing here uses it."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "add_env_info", None)
    if original is None:
        yield
        return
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.add_env_info = original


def _usable_tokenizer(tokenizer: Any) -> Any:
    """lm-eval sets a missing pad token on the tokenizer it is given: give it a copy in that case."""
    if tokenizer.pad_token is not None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with")
    return tokenizer


# -- entry points ----------------------------------------------------------------------------------


@dataclass
class GeneralRun:
    """Scores plus what they cost: model requests, forward tokens and seconds per task; and, for
    the paired statistics of the edit budget, each item's headline value (``item_scores``, in item
    order; tasks whose items have no value of their own, such as perplexities, are absent) and
    the headline a model guessing uniformly would get (``chance``, multiple-choice tasks only)."""

    scores: dict[str, dict[str, float]]
    items: dict[str, int]
    costs: dict[str, TaskCost]
    seconds: float
    item_scores: dict[str, list[float]] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)


def _item_values(samples: list[dict], metrics: dict[str, str], headline_metric: str, mass_of_true: bool = False) -> tuple[list[float] | None, float | None]:
    """Per item (by ``doc_id``) the headline value from lm-eval's logged samples, and the mean
    chance level: 1 / options for multiple choice; with ``mass_of_true`` (TruthfulQA MC2, whose
    score is the probability mass of the true answers) the share of true answers."""
    key = next((key for key, ours in metrics.items() if ours == headline_metric), None)
    if key is None:
        return None, None
    metric, _, filter_name = key.partition(",")
    rows = sorted((s for s in samples if s.get("filter", "none") == filter_name), key=lambda s: s["doc_id"])
    values = [s.get(metric) for s in rows]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None, None
    chances = []
    for sample in rows:
        doc, options = sample.get("doc") or {}, len(sample.get("arguments") or ())
        if mass_of_true and "mc2_labels" in doc:
            chances.append(sum(doc["mc2_labels"]) / len(doc["mc2_labels"]))
        elif options > 1:
            chances.append(1.0 / options)
    chance = sum(chances) / len(chances) if len(chances) == len(rows) else None
    return [float(v) for v in values], chance


def run_general(model: torch.nn.Module, tokenizer: Any, config: GeneralConfig) -> GeneralRun:
    """:func:`evaluate_general` with the items, requests, tokens and seconds of each task."""
    check_tasks(config.tasks)
    if not config.tasks:
        return GeneralRun({}, {}, {}, 0.0)
    tick = time.perf_counter()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if config.source == "local":
        data_dir = Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()
        cache = cache_dir() / "general"
        prepared = {name: _prepare_local(name, config, data_dir, cache) for name in config.tasks}
        lm_eval_names = {name: name for name in config.tasks}
        task_specs: list[Any] = [prepared[name].config for name in config.tasks]
        manager = TaskManager(include_defaults=False)
        arguments: dict[str, Any] = {}
    elif config.source == "hub":
        lm_eval_names = hub_task_names(config)
        shots = {config.fewshot_of(name) for name in config.tasks}
        if len(shots) > 1:
            raise ValueError(f"source='hub' takes one number of few-shot examples for all tasks; per-task shots ({sorted(shots)}) need source='local'")
        prepared = {name: _Prepared(config={}, metrics=_SPECS[name].metrics, items=config.limit or 0, fewshot=config.fewshot_of(name)) for name in config.tasks}
        task_specs = list(lm_eval_names.values())
        manager = TaskManager()
        arguments = {"limit": config.limit, "num_fewshot": shots.pop()}
    else:
        raise ValueError(f"general source must be one of {SOURCES}, got {config.source!r}")

    chat = uses_chat_template(config.chat_template, tokenizer)
    if chat:
        arguments["apply_chat_template"] = True
    with _model_untouched(model), _random_state_untouched():
        lm = _in_memory_lm(model, _usable_tokenizer(tokenizer), config.batch_size)
        with _without_environment_report():
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_specs,
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=True,  # each item's score, for the paired tests of the edit budget
                random_seed=config.seed,
                numpy_random_seed=config.seed,
                torch_random_seed=config.seed,
                fewshot_random_seed=config.seed,
                **arguments,
            )
    results = output["results"]
    scores: dict[str, dict[str, float]] = {}
    for name in config.tasks:
        row = results.get(lm_eval_names[name], {})
        scores[name] = {ours: float(row[key]) for key, ours in prepared[name].metrics.items() if isinstance(row.get(key), (int, float))}
        if HEADLINE[name][0] not in scores[name]:
            logger.warning("general: %s: lm-eval reported no %s (its results: %s)", name, HEADLINE[name][0], sorted(row))
    item_scores: dict[str, list[float]] = {}
    chance: dict[str, float] = {}
    for name in config.tasks:
        samples = output.get("samples", {}).get(lm_eval_names[name], [])
        values, level = _item_values(samples, prepared[name].metrics, HEADLINE[name][0], mass_of_true=name == "truthfulqa_mc2")
        if values is not None:
            item_scores[name] = values
        if level is not None:
            chance[name] = level
    costs = {name: lm.costs.get(lm_eval_names[name], TaskCost()) for name in config.tasks}
    seconds = time.perf_counter() - tick
    for name in config.tasks:
        cost = costs[name]
        logger.info(
            "general: %s (%d items, %d-shot): %d requests, %d tokens, %.1f s: %s",
            name,
            prepared[name].items,
            prepared[name].fewshot,
            cost.requests,
            cost.tokens,
            cost.seconds,
            ", ".join(f"{k}={v:.4g}" for k, v in scores[name].items()),
        )
    logger.info(
        "general: %d task(s) in %.1f s (%.1f s outside the model)%s",
        len(config.tasks), seconds, seconds - sum(c.seconds for c in costs.values()), ", prompts in the chat template" if chat else "",
    )
    return GeneralRun(
        scores=scores, items={name: prepared[name].items for name in config.tasks}, costs=costs, seconds=seconds, item_scores=item_scores, chance=chance
    )


def evaluate_general(model: torch.nn.Module, tokenizer: Any, config: GeneralConfig) -> dict[str, dict[str, float]]:
    """Score ``model`` (as it is in memory) on ``config.tasks``: ``{task: {metric: value}}``.

    For example ``{"hellaswag": {"acc": .., "acc_norm": ..}, "wikitext": {"word_perplexity": ..,
    "byte_perplexity": .., "bits_per_byte": ..}}``; :data:`HEADLINE` names each task's main
    metric and its direction. The model's train/eval flags, ``requires_grad`` flags, parameters
    and the global random generators are as they were afterwards; the model is only read.
    """
    return run_general(model, tokenizer, config).scores
