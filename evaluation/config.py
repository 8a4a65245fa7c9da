"""The settings of an ``edit.py`` run besides the editor's: its modes, how edits are scored
(:class:`EvalConfig`) and the general-ability suite (:class:`GeneralConfig`).

Plain data that imports no torch, so that ``edit.py --help`` lists them quickly. The code that
uses them (:mod:`evaluation.runner`, :mod:`evaluation.scoring`, :mod:`evaluation.general`)
re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# The task names come from the task table (a module that imports no torch), so that a task is
# added by its row alone.
from .general.tasks import TASKS

# How edit.py applies the edits (see :mod:`evaluation.runner`), and where a sequential run scores
# all edits so far and the general suite unless --checkpoints says otherwise.
MODES = ("single", "batch", "sequential")
# When a sequential run scores a case: on the model carrying every edit ("final"), or right after
# its own edit ("immediate", EasyEdit's sequential evaluation).
SEQUENTIAL_SCORING = ("final", "immediate")
DEFAULT_CHECKPOINTS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)
GENERATION_BUDGETS = ("target", "open")
CHAT_TEMPLATE = ("off", "on", "auto")  # whether prompts go through the tokenizer's chat template


@dataclass
class EvalConfig:
    """How edits are scored (shared by every editor and mode)."""

    batch_size: int = field(default=32, metadata={"help": "sequences per forward pass when scoring"})
    case_batch: int = field(
        default=32,
        metadata={
            "help": "cases measured together, their probes sharing forward passes and decoding steps (before editing, and after "
            "it with each case's own weight change on its rows; memory and patch edits are measured one case at a time); 1: each case alone"
        },
    )
    edit_together: bool = field(
        default=True,
        metadata={
            "help": "in single and batch modes, let an editor that can (FT-L, FT-M) compute a chunk's independent edits in one "
            "training batch, each case with its own copy of the tuned weights; seconds per edit are then the chunk's editing "
            "time shared out. false: one edit at a time (the time one edit alone takes)"
        },
    )
    fluency: bool = field(default=True, metadata={"help": "sample from the case's generation prompts and score their n-gram entropy (fluency)"})
    generation_prompts: int = field(
        default=1,
        metadata={"help": "distinct generation prompts sampled per case for fluency (ROME uses all 10 of CounterFact's; each costs about 6 s on 2 CPU cores)"},
    )
    generation_length: int = field(default=100, metadata={"help": "new tokens per fluency sample (ROME: 100)"})
    top_k: int = field(default=5, metadata={"help": "top-k sampling of the fluency samples (ROME: 5)"})
    seed: int = field(default=0, metadata={"help": "sampling seed, the same for the pre- and post-edit samples"})
    generation_scoring: bool = field(
        default=True,
        metadata={"help": "also answer the edit, rephrased and portability prompts by greedy generation and score exact match and containment (gen_* keys)"},
    )
    generation_max_new_tokens: int = field(
        default=16,
        metadata={"help": "cap on a greedy answer's new tokens (each answer gets its longest accepted answer's token length + 3)"},
    )

    generation_budget: str = field(
        default="target",
        metadata={
            "help": "new tokens of a greedy answer: 'target' (its longest accepted answer's length + 3, at most "
            "generation_max_new_tokens) or 'open' (generation_max_new_tokens for every answer, stopping at the model's "
            "own end of sequence; the answer's length is not given away)"
        },
    )
    join: str = field(
        default="smart",
        metadata={
            "help": "how prompt and target are joined when editing and scoring: 'smart' (a space unless one is there) or "
            "'reference' (always a space, as EasyEdit's and ROME's code; a target starting with a space then follows two)"
        },
    )
    chat_template: str = field(
        default="off",
        metadata={
            "help": "ask the generation-scoring prompts as one user turn of the tokenizer's chat template: 'on' (an "
            "error if it has none), 'auto' (when it has one) or 'off'. Teacher-forced scores and fluency keep plain prompts"
        },
    )

    def __post_init__(self) -> None:
        if self.case_batch < 1 or self.batch_size < 1:
            raise ValueError(f"case_batch and batch_size must be at least 1, got {self.case_batch} and {self.batch_size}")
        if self.generation_max_new_tokens < 1:
            raise ValueError(f"generation_max_new_tokens must be at least 1, got {self.generation_max_new_tokens}")
        if self.generation_budget not in GENERATION_BUDGETS:
            raise ValueError(f"generation_budget must be one of {GENERATION_BUDGETS}, got {self.generation_budget!r}")
        if self.chat_template not in CHAT_TEMPLATE:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE}, got {self.chat_template!r}")
        if self.join not in ("smart", "reference"):
            raise ValueError(f"join must be 'smart' or 'reference', got {self.join!r}")


# --------------------------------------------------------------------------------------------
# The general-ability suite (:mod:`evaluation.general`)
# --------------------------------------------------------------------------------------------


GENERAL_SOURCES = ("local", "hub")

FEWSHOT_PRESETS: dict[str, dict[str, int]] = {
    # The shots of "Should We Really Edit Language Models?" (Li et al., 2024, table of datasets):
    # MMLU 5, BBH 3, GSM8K 8, CommonsenseQA 7, TriviaQA 0, TruthfulQA 0. The paper prompts with
    # chain-of-thought exemplars and scores generated answers; here the shots are answer-only and
    # the tasks keep their own scoring (log-likelihood for MMLU and CommonsenseQA).
    "paper": {"mmlu": 5, "bbh": 3, "gsm8k": 8, "commonsense_qa": 7, "triviaqa": 0, "truthfulqa_mc1": 0, "truthfulqa_mc2": 0},
}


class UnknownTaskError(ValueError):
    pass


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise UnknownTaskError(f"unknown general-ability task(s) {', '.join(map(repr, unknown))}; supported: {', '.join(TASKS)}")
    duplicates = sorted({name for name in tasks if list(tasks).count(name) > 1})
    if duplicates:
        raise ValueError(f"general-ability task(s) listed twice: {', '.join(duplicates)}")


@dataclass
class GeneralConfig:
    """The general-ability suite run on the edited model: which tasks, on which data, how many items."""

    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": f"general-ability tasks to score; empty turns the suite off. Any of: {', '.join(TASKS)}"},
    )
    limit: int | None = field(
        default=100,
        metadata={
            "help": "items per task (None: all). MMLU and BBH: a total over all subjects, a fixed sample drawn with `seed`; "
            "wikitext: whole articles (the test set has 62, about 4,900 tokens each)"
        },
    )
    task_limits: dict[str, int] | None = field(
        default=None,
        metadata={"help": "per-task overrides of `limit`, e.g. {wikitext: 3} (local source only)"},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "folder of the local benchmark files (default: $FACTEDIT_GENERAL_DATA, else <project>/../shared/data/general)"},
    )
    source: str = field(default="local", metadata={"help": "'local': the files in data_dir; 'hub': lm-eval's standard tasks (needs internet)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass (at most batch_size * 256 tokens)"})
    num_fewshot: int = field(
        default=0,
        metadata={
            "help": "few-shot examples per prompt, fixed for the run and drawn with `seed` from items that are not evaluated "
            "(MMLU: the subject's dev set; BBH: the task's prompt file, at most 3). Not used by lambada, wikitext and "
            "truthfulqa (which has its fixed six-question primer)"
        },
    )
    task_fewshot: dict[str, int] | None = field(
        default=None,
        metadata={"help": "per-task overrides of num_fewshot, e.g. {mmlu: 5, gsm8k: 8}"},
    )
    fewshot_preset: str | None = field(
        default=None,
        metadata={
            "help": "'paper': the shots of 'Should We Really Edit Language Models?' (MMLU 5, BBH 3, GSM8K 8, "
            "CommonsenseQA 7, TriviaQA and TruthfulQA 0), answer-only; task_fewshot entries override it"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the MMLU/BBH item sample and of the few-shot draw"})
    chat_template: str = field(
        default="off",
        metadata={
            "help": "wrap every prompt of the suite in the tokenizer's chat template as one user turn: 'on' (an error "
            "if the tokenizer has none), 'auto' (when it has one) or 'off' (plain prompts, as lm-eval's tasks)"
        },
    )
    safety_dir: str | None = field(
        default=None,
        metadata={"help": "folder of the safety sets (default: $FACTEDIT_SAFETY_DATA, else the 'safety' folder beside data_dir's)"},
    )
    safety_max_tokens: int = field(default=64, metadata={"help": "new tokens of the greedy answer the refusal judge reads"})
    refusal_judge: str = field(
        default="phrases",
        metadata={"help": "'phrases' (a refusal-phrase matcher, see evaluation.safety) or 'module.path:function' taking (prompt, answer) -> bool"},
    )

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks or [])
        if self.chat_template not in CHAT_TEMPLATE:
            raise ValueError(f"general chat_template must be one of {CHAT_TEMPLATE}, got {self.chat_template!r}")
        if self.safety_max_tokens < 1:
            raise ValueError(f"general safety_max_tokens must be at least 1, got {self.safety_max_tokens}")
        check_tasks(self.tasks)
        if self.source not in GENERAL_SOURCES:
            raise ValueError(f"general source must be one of {GENERAL_SOURCES}, got {self.source!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"general limit must be a positive number of items or None, got {self.limit}")
        self.task_limits = dict(self.task_limits or {})
        check_tasks(list(self.task_limits))
        if any(not isinstance(n, int) or n < 1 for n in self.task_limits.values()):
            raise ValueError(f"general task_limits must map tasks to positive numbers of items, got {self.task_limits}")
        if self.batch_size < 1:
            raise ValueError(f"general batch_size must be at least 1, got {self.batch_size}")
        if self.num_fewshot < 0:
            raise ValueError(f"general num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.fewshot_preset is not None and self.fewshot_preset not in FEWSHOT_PRESETS:
            raise ValueError(f"general fewshot_preset must be one of {sorted(FEWSHOT_PRESETS)} or None, got {self.fewshot_preset!r}")
        self.task_fewshot = dict(self.task_fewshot or {})
        check_tasks(list(self.task_fewshot))
        if any(not isinstance(n, int) or n < 0 for n in self.task_fewshot.values()):
            raise ValueError(f"general task_fewshot must map tasks to numbers of examples >= 0, got {self.task_fewshot}")

    def fewshot_of(self, task: str) -> int:
        """Few-shot examples for ``task``: its ``task_fewshot`` entry, else the preset's, else ``num_fewshot``."""
        if task in (self.task_fewshot or {}):
            return self.task_fewshot[task]
        preset = FEWSHOT_PRESETS.get(self.fewshot_preset or "", {})
        return preset.get(task, self.num_fewshot)

    def limit_of(self, task: str) -> int | None:
        """Items scored for ``task``: its entry in ``task_limits``, else ``limit``."""
        return self.task_limits.get(task, self.limit) if self.task_limits else self.limit
