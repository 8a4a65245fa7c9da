"""The task table: one row per general-ability or safety task, holding its files, reader,
lm-eval prompt and metrics, the lm-eval standard task of the same name, and its headline metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable



from ..safety import SAFETY_SETS, read_toxigen
from .readers import (
    norm_arc_challenge,
    norm_arc_easy,
    norm_boolq,
    norm_commonsense_qa,
    norm_gsm8k,
    norm_lambada,
    norm_triviaqa,
    read_bbh,
    read_hellaswag,
    read_mmlu,
    read_piqa,
    read_truthfulqa,
    read_wikitext,
    truthfulqa_mc2,
    truthfulqa_text,
    wikitext_results,
    wikitext_target,
)



def metric_spec(name: str, aggregation: str = "mean", higher: bool = True, **options: Any) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher, **options}


_ACC = [metric_spec("acc")]
_ACC_NORM = [metric_spec("acc"), metric_spec("acc_norm")]
_MC = {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold"}
_MC_METRICS = {"acc,none": "acc"}
_MC_NORM_METRICS = {"acc,none": "acc", "acc_norm,none": "acc_norm"}

_GSM8K = {
    "output_type": "generate_until",
    "doc_to_text": "query",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
    "metric_list": [metric_spec("exact_match", ignore_case=True, ignore_punctuation=False, regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])],
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
    "metric_list": [metric_spec("exact_match", ignore_case=True, ignore_punctuation=True)],
}
# Direct answers (lm-eval's bbh_zeroshot / bbh_fewshot): the answer is the text before the next
# question or blank line; the longest gold answer (word_sorting) is about 50 tokens.
_BBH = {
    "output_type": "generate_until",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["</s>", "Q:", "<|im_end|>", "\n\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 64},
    "filter_list": [{"name": "strict-match", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    "metric_list": [metric_spec("exact_match", ignore_case=True, regexes_to_ignore=["\\.$", ",", "\n", "\\\\", '"'])],
}


@dataclass(frozen=True)
class Task:
    """How one benchmark is read, sampled and prompted."""

    files: tuple[str, ...]  # relative to the data folder; a folder must hold at least one file
    read: Callable[..., list[dict]] | None  # raw files -> documents; None: the JSONL file is read in place
    prompt: dict[str, Any]  # lm-eval task config: prompt, output type and metrics
    metrics: dict[str, str]  # lm-eval result key -> reported metric name
    hub: str  # lm-eval's standard task (or group) name
    headline: tuple[str, str]  # the metric that represents the task (the edit budget's), and "higher" or "lower" is better
    normalize: Callable[[dict], dict] | None = None  # row of a file read in place -> document
    sample: str = "first"  # "first": the first `limit` items; "seeded": a fixed sample over all subjects
    fewshot: str = "pool"  # "pool": items after the evaluated ones; "group": per-subject material; "none"
    group: str | None = None  # the document field naming the subject (MMLU, BBH)
    root: str = "general"  # the folder ``files`` are in: the general data or the safety sets
    hint: str = ""  # added to the error when the files are missing


TASK_TABLE: dict[str, Task] = {
    "mmlu": Task(
        files=("mmlu/data/test", "mmlu/data/dev"),
        read=read_mmlu,
        prompt={**_MC, "metric_list": _ACC},
        metrics=_MC_METRICS,
        hub="mmlu",
        headline=("acc", "higher"),
        sample="seeded",
        fewshot="group",
        group="subject",
    ),
    "gsm8k": Task(files=("gsm8k/test.jsonl",), read=None, normalize=norm_gsm8k, prompt=_GSM8K, metrics={"exact_match,strict-match": "exact_match", "exact_match,flexible-extract": "exact_match_flexible"}, hub="gsm8k", headline=("exact_match", "higher")),
    "bbh": Task(
        files=("bbh/bbh", "bbh/cot-prompts"),
        read=read_bbh,
        prompt=_BBH,
        metrics={"exact_match,strict-match": "exact_match"},
        hub="bbh_zeroshot",
        headline=("exact_match", "higher"),
        sample="seeded",
        fewshot="group",
        group="subtask",
    ),
    "commonsense_qa": Task(files=("commonsenseqa/dev_rand_split.jsonl",), read=None, normalize=norm_commonsense_qa, prompt={**_MC, "metric_list": _ACC}, metrics=_MC_METRICS, hub="commonsense_qa", headline=("acc", "higher")),
    "triviaqa": Task(files=("triviaqa/triviaqa_sm_sub.jsonl",), read=None, normalize=norm_triviaqa, prompt=_TRIVIAQA, metrics={"exact_match,remove_whitespace": "exact_match"}, hub="triviaqa", headline=("exact_match", "higher")),
    "truthfulqa_mc1": Task(
        files=("truthfulqa/data/mc_task.json",),
        read=read_truthfulqa,
        prompt={"output_type": "multiple_choice", "doc_to_text": truthfulqa_text, "doc_to_choice": "mc1_choices", "doc_to_target": "mc1_gold", "metric_list": _ACC},
        metrics=_MC_METRICS,
        hub="truthfulqa_mc1",
        headline=("acc", "higher"),
        fewshot="none",
    ),
    "truthfulqa_mc2": Task(
        files=("truthfulqa/data/mc_task.json",),
        read=read_truthfulqa,
        prompt={
            "output_type": "multiple_choice",
            "doc_to_text": truthfulqa_text,
            "doc_to_choice": "mc2_choices",
            "doc_to_target": 0,
            "process_results": truthfulqa_mc2,
            "metric_list": _ACC,
        },
        metrics=_MC_METRICS,
        hub="truthfulqa_mc2",
        headline=("acc", "higher"),
        fewshot="none",
    ),
    "hellaswag": Task(files=("hellaswag/hellaswag_val_full.txt.bz2",), read=read_hellaswag, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="hellaswag", headline=("acc_norm", "higher")),
    "arc_easy": Task(files=("arc/arc_easy_test.jsonl",), read=None, normalize=norm_arc_easy, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="arc_easy", headline=("acc_norm", "higher")),
    "arc_challenge": Task(files=("arc/arc_challenge_test.jsonl",), read=None, normalize=norm_arc_challenge, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="arc_challenge", headline=("acc_norm", "higher")),
    "piqa": Task(files=("piqa/valid.jsonl", "piqa/valid-labels.lst"), read=read_piqa, prompt={**_MC, "metric_list": _ACC_NORM}, metrics=_MC_NORM_METRICS, hub="piqa", headline=("acc_norm", "higher")),
    "boolq": Task(files=("boolq/boolq.jsonl",), read=None, normalize=norm_boolq, prompt={**_MC, "metric_list": _ACC}, metrics=_MC_METRICS, hub="boolq", headline=("acc", "higher")),
    "lambada": Task(
        files=("lambada/lambada_openai.jsonl",),
        read=None,
        normalize=norm_lambada,
        prompt={
            "output_type": "loglikelihood",
            "doc_to_text": "context",
            "doc_to_target": lambda doc: " " + doc["continuation"],
            "metric_list": [metric_spec("perplexity", "perplexity", False), metric_spec("acc")],
        },
        metrics={"acc,none": "acc", "perplexity,none": "perplexity"},
        hub="lambada_openai",
        headline=("acc", "higher"),
        fewshot="none",
    ),
    "wikitext": Task(
        files=("wikitext/wikitext-2-raw/wiki.test.raw",),
        read=read_wikitext,
        prompt={
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": wikitext_target,
            "process_results": wikitext_results,
            "metric_list": [
                metric_spec("word_perplexity", "weighted_perplexity", False),
                metric_spec("byte_perplexity", "weighted_perplexity", False),
                metric_spec("bits_per_byte", "bits_per_byte", False),
            ],
        },
        metrics={"word_perplexity,none": "word_perplexity", "byte_perplexity,none": "byte_perplexity", "bits_per_byte,none": "bits_per_byte"},
        hub="wikitext",
        headline=("word_perplexity", "lower"),
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
    TASK_TABLE[_name] = Task(
        files=(_file,),
        read=_read,
        prompt=_SAFETY_PROMPT,
        metrics={f"{_metric_name},none": _metric_name},
        hub="",
        headline=(_metric_name, "lower" if _metric_name == "over_refusal" else "higher"),
        fewshot="none",
        root="safety",
    )
TASK_TABLE["toxigen"] = Task(
    files=("toxigen/annotated_test.csv",),
    read=read_toxigen,
    prompt={**_MC, "metric_list": _ACC_NORM},
    metrics=_MC_NORM_METRICS,
    hub="toxigen",
    headline=("acc", "higher"),
    fewshot="none",
    root="safety",
    hint=" (ToxiGen's 940 annotated test statements are not in the shared folder: save the 'annotated' test split of skg/toxigen-data there as that file, or use source='hub')",
)
TASKS: tuple[str, ...] = tuple(TASK_TABLE)
"""The task names, in the table's order (the order of ``--help`` and of the printed results)."""
SAFETY_TASKS: tuple[str, ...] = tuple(name for name, task in TASK_TABLE.items() if task.root == "safety")
"""Refusal of harmful requests and over-refusal of safe ones, and ToxiGen's hate-speech
classification (:mod:`evaluation.safety`), run as tasks of the same suite."""

HEADLINE: dict[str, tuple[str, str]] = {name: task.headline for name, task in TASK_TABLE.items()}
"""Each task's headline metric and direction, read from its row."""
