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

The package, by job: :mod:`.tasks` (the task table: one row per task with its files, reader,
prompt, metrics and headline metric), :mod:`.readers` (raw files -> documents), :mod:`.data`
(local files -> lm-eval task configs), :mod:`.scorer` (:class:`PrefixScorer`) and :mod:`.suite`
(:func:`run_general`). To add a task, add a row to :data:`.tasks.TASK_TABLE` (and its reader to
:mod:`.readers` when its files need converting) and its name to ``evaluation/config.py``'s ``TASKS``.
"""


import importlib
from typing import Any

# What each public name is imported from. The names are loaded on first use (PEP 562), so that
# importing the torch-free task table (``evaluation.config`` reads the task names from it) does
# not import the scorer and torch.
_EXPORTS = {
    "SOURCES": ("..config", "GENERAL_SOURCES"),
    "TASKS": (".tasks", "TASKS"),
    "GeneralConfig": ("..config", "GeneralConfig"),
    "UnknownTaskError": ("..config", "UnknownTaskError"),
    "check_tasks": ("..config", "check_tasks"),
    "uses_chat_template": ("..generation", "uses_chat_template"),
    "MissingDataError": (".data", "MissingDataError"),
    "default_data_dir": (".data", "default_data_dir"),
    "hub_task_names": (".data", "hub_task_names"),
    "PrefixScorer": (".scorer", "PrefixScorer"),
    "GeneralRun": (".suite", "GeneralRun"),
    "TaskCost": (".suite", "TaskCost"),
    "evaluate_general": (".suite", "evaluate_general"),
    "run_general": (".suite", "run_general"),
    "HEADLINE": (".tasks", "HEADLINE"),
    "TASK_TABLE": (".tasks", "TASK_TABLE"),
    "Task": (".tasks", "Task"),
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "HEADLINE",
    "SOURCES",
    "TASKS",
    "TASK_TABLE",
    "GeneralConfig",
    "GeneralRun",
    "MissingDataError",
    "PrefixScorer",
    "Task",
    "TaskCost",
    "UnknownTaskError",
    "check_tasks",
    "default_data_dir",
    "evaluate_general",
    "hub_task_names",
    "run_general",
    "uses_chat_template",
]
