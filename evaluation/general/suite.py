"""Running the suite: lm-eval over the model in memory (:func:`run_general`), with the caller's
weights, random state and environment left as they were; item-level scores for the paired tests
of the edit budget."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from factedit.batches import pad_id
from factedit.files import cache_root

from ..config import GENERAL_SOURCES as SOURCES
from ..config import GeneralConfig, check_tasks
from ..generation import uses_chat_template
from .data import Prepared, default_data_dir, hub_task_names, prepare_local
from .scorer import PrefixScorer
from .tasks import HEADLINE, TASK_TABLE

logger = logging.getLogger(__name__)


# -- the lm-eval model wrapper -------------------------------------------------------------------


@dataclass
class TaskCost:
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0


def in_memory_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int):
    """An HFLM over ``model`` as it is in memory, with per-task costs and shared-prefix scoring."""
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        def __init__(self) -> None:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            self.costs: dict[str, TaskCost] = defaultdict(TaskCost)
            self.scorer = PrefixScorer(model, self.max_length, batch_size, pad_id=pad_id(self.tokenizer))
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
        cache = cache_root() / "general"
        prepared = {name: prepare_local(name, config, data_dir, cache) for name in config.tasks}
        lm_eval_names = {name: name for name in config.tasks}
        task_specs: list[Any] = [prepared[name].config for name in config.tasks]
        manager = TaskManager(include_defaults=False)
        arguments: dict[str, Any] = {}
    elif config.source == "hub":
        lm_eval_names = hub_task_names(config)
        shots = {config.fewshot_of(name) for name in config.tasks}
        if len(shots) > 1:
            raise ValueError(f"source='hub' takes one number of few-shot examples for all tasks; per-task shots ({sorted(shots)}) need source='local'")
        prepared = {name: Prepared(config={}, metrics=TASK_TABLE[name].metrics, items=config.limit or 0, fewshot=config.fewshot_of(name)) for name in config.tasks}
        task_specs = list(lm_eval_names.values())
        manager = TaskManager()
        arguments = {"limit": config.limit, "num_fewshot": shots.pop()}
    else:
        raise ValueError(f"general source must be one of {SOURCES}, got {config.source!r}")

    chat = uses_chat_template(config.chat_template, tokenizer)
    if chat:
        arguments["apply_chat_template"] = True
    with _model_untouched(model), _random_state_untouched():
        lm = in_memory_lm(model, _usable_tokenizer(tokenizer), config.batch_size)
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
