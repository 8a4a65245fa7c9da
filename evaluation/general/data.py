"""Local benchmark data -> lm-eval task configs: the files a task needs, their JSON Lines form
(written once per source content), the evaluated items, and the few-shot examples."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence



from factedit.jsonl import write_jsonl

from ..config import GeneralConfig
from ..safety import SAFETY_SETS, RefusalResults, default_safety_dir, load_judge
from .readers import read_documents
from .tasks import HEADLINE, TASK_TABLE, Task, metric_spec

logger = logging.getLogger(__name__)


class MissingDataError(FileNotFoundError):
    pass


def default_data_dir() -> Path:
    env = os.environ.get("FACTEDIT_GENERAL_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "general"  # ../shared beside a checkout


_FORMAT_VERSION = "2"  # part of every derived file's key: bump when a reader's output changes


def _required_paths(name: str, data_dir: Path, safety_dir: Path | None = None) -> list[Path]:
    if TASK_TABLE[name].root == "safety":
        data_dir = safety_dir or default_safety_dir(data_dir)
    paths = []
    for relative in TASK_TABLE[name].files:
        path = data_dir / relative
        present = path.is_file() or (path.is_dir() and any(child.is_file() for child in path.iterdir()))
        if not present:
            raise MissingDataError(
                f"general task {name!r} needs {path}, which is missing. Point GeneralConfig.data_dir (or "
                f"$FACTEDIT_GENERAL_DATA) at the benchmark folder, or use source='hub'"
                if TASK_TABLE[name].root == "general"
                else f"safety task {name!r} needs {path}, which is missing{TASK_TABLE[name].hint}. Point GeneralConfig.safety_dir (or "
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
    stem = TASK_TABLE[name].files[0].split("/")[0]  # truthfulqa_mc1 and _mc2 share one file
    target = cache / f"{stem}-{_sha256_of(paths)[:16]}.jsonl"
    if target.is_file():
        return target, read_documents(target)
    docs = read(*paths)
    if not docs:
        raise ValueError(f"general task {name!r}: no items found in {', '.join(map(str, paths))}")
    write_jsonl(target, docs, ensure_ascii=False)
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
class Prepared:
    config: dict[str, Any]
    metrics: dict[str, str]
    items: int
    fewshot: int


def _rng(config: GeneralConfig, name: str, purpose: str) -> random.Random:
    return random.Random(f"{config.seed}:{name}:{purpose}")


def prepare_local(name: str, config: GeneralConfig, data_dir: Path, cache: Path) -> Prepared:
    """An lm-eval task config for ``name`` over the local files: items, few-shot examples, prompt."""
    spec = TASK_TABLE[name]
    paths = _required_paths(name, data_dir, Path(config.safety_dir).expanduser() if config.safety_dir else None)
    if spec.read is None:
        data_file, rows = paths[0], read_documents(paths[0])
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
        prompt["metric_list"] = [metric_spec(metric, higher=HEADLINE[name][1] == "higher")]
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
    return Prepared(config=prompt, metrics=spec.metrics, items=len(indices), fewshot=k)


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


def _grouped_prompt(name: str, spec: Task, rows: list[dict], k: int, rng: random.Random) -> _GroupedPrompt:
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
        if not TASK_TABLE[name].hub:
            raise ValueError(f"general task {name!r} has no lm-eval standard task; use source='local'")
        names[name] = TASK_TABLE[name].hub
        if name == "bbh" and config.fewshot_of(name):
            names[name] = "bbh_fewshot"
    return names


