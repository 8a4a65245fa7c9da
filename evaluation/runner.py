"""The edit-and-evaluate loop behind ``edit.py``.

Modes:

* ``single``: each request is edited alone, scored, and reverted before the next.
* ``batch``: ``edits_per_call`` requests are edited in one call, scored, and reverted.
* ``sequential``: edits accumulate (``edits_per_call`` requests per call); every case is scored
  on the model carrying all the edits (``sequential_scoring="final"``), or right after its own
  edit, with the edits before it (``"immediate"``: EasyEdit's sequential evaluation; the model
  carrying all edits is then scored once more at the last checkpoint). Each edit is saved under ``edits/`` as it is made, so an
  interrupted run re-applies them on resume instead of recomputing. At checkpoints (by default
  1, 5, 10, 20, 50, 100, 200, 500, 1000 edits and the last), all edits made so far are scored
  again (retention) and the general-ability suite (:mod:`evaluation.general`) is run on the
  edited model in memory; each checkpoint is a line of ``checkpoints.jsonl``, checkpoint 0
  being the unedited model. The run ends with a plot of every score against the number of
  edits, a markdown table, and the edit budget (:mod:`evaluation.compare`).

Requests that share a ``group`` (the rewrites of one multi-hop case) are always edited together:
in one call when the editor can batch, else by successive calls; in ``single`` mode the group is
scored with all its rewrites applied and then reverted.

Every finished case is appended to ``cases.jsonl`` at once (flushed and synced), holding the
raw measurements before and after editing; ``summary.json`` is recomputed from that file, so a
run that is stopped and started again with the same command continues where it stopped and ends
with the same summary. The folder's layout and its file handling belong to
:class:`evaluation.run_dir.RunDir`; this module only runs the loop.

A case that raises while it is measured before editing (``pre``), edited (``edit``) or measured
after (``post``) does not stop the run: its line in ``cases.jsonl`` holds ``failed`` (the stage,
the error's type and message) instead of measurements, the summary counts it as failed and
scores the other cases, and the run goes on with the next case (in single and batch modes with
the model reverted; in sequential mode without that edit, the others staying). A recorded
failure is finished work: a resumed run does not try it again, ``--overwrite`` or another
``--out`` does. Out-of-memory errors and interrupts are not case failures and stop the run.

While the run goes, the progress bar names the stage of the case at hand (``pre-scoring``,
``editing``, ``post-scoring``, with ``: fluency`` or ``: generation`` during those steps) and
TensorBoard receives every finished case and the running means (:mod:`evaluation.board`).
``summary.json`` records where the numbers come from (:mod:`evaluation.provenance`), and so does
every edit the run saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from factedit.editors.base import Edit, Editor, EditorConfig, EditRequest
from factedit.editors.lm import join_rule, model_device
from factedit.editors.provenance import utc_now

from .board import RunBoard
from .compare.scores import case_values, standard_error
from .config import DEFAULT_CHECKPOINTS, MODES, SEQUENTIAL_SCORING
from .distributed import current_shard
from .efficiency import measure
from .provenance import run_provenance
from .run_dir import JsonlWriter, RunDir, read_jsonl
from .scoring import EvalConfig, RunMetrics, case_scores, measure_case, protocols_of

if TYPE_CHECKING:
    from .general import GeneralConfig

logger = logging.getLogger(__name__)

class ModelLeftChangedError(RuntimeError):
    """An editor failed and left the model other than it found it (weights or hooks): no later
    case could be trusted, so the run stops (what it recorded is kept)."""


FATAL_ERRORS: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError, ModelLeftChangedError)
"""Errors that stop the run rather than fail one case: they say the machine (or a model an editor
left damaged), not the case, is at fault; a rerun with more memory (or a smaller batch) would
succeed."""


def model_state(model: torch.nn.Module) -> tuple[str, int]:
    """What a failed edit must leave as it was: the weights' fingerprint (a strided sample of
    every parameter, about 25 ms for a 135M-parameter model) and the number of forward hooks."""
    from factedit.models import model_fingerprint

    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return model_fingerprint(model), hooks


class EditorSetupError(RuntimeError):
    """The editor's settings do not fit the model (an architecture missing from the targets
    table, a layer out of range): found by :meth:`Editor.prepare` before any case is scored."""


def edit_units(requests: Sequence[EditRequest], size: int) -> list[list[EditRequest]]:
    """Requests packed into editor calls of at most ``size``; a group (consecutive requests with
    the same ``group``) is never split, and a group larger than ``size`` is a call of its own."""
    blocks: list[list[EditRequest]] = []
    for request in requests:
        group = getattr(request, "group", None)
        if blocks and group is not None and getattr(blocks[-1][0], "group", None) == group:
            blocks[-1].append(request)
        else:
            blocks.append([request])
    units: list[list[EditRequest]] = []
    for block in blocks:
        if units and len(units[-1]) + len(block) <= size:
            units[-1].extend(block)
        else:
            units.append(list(block))
    return units


def checkpoint_schedule(total: int, requested: Sequence[int] | None = None) -> list[int]:
    """The numbers of edits at which a sequential run is scored: those requested (default
    :data:`DEFAULT_CHECKPOINTS`) up to ``total``, and ``total`` itself."""
    wanted = DEFAULT_CHECKPOINTS if requested is None else requested
    if any(c < 1 for c in wanted):
        raise ValueError(f"checkpoints are numbers of edits >= 1, got {list(wanted)}")
    return sorted({c for c in wanted if c <= total} | ({total} if total else set()))


def _record(request: EditRequest, pre: dict, post: dict, **extra: Any) -> dict[str, Any]:
    return {
        "case_id": request.case_id,
        "prompt": request.prompt,
        "target_new": request.target_new,
        "target_true": request.target_true,
        **extra,
        "pre": {"scores": case_scores(pre), "raw": pre},
        "post": {"scores": case_scores(post, reference=pre), "raw": post},
    }


def _failure(request: EditRequest, stage: str, error_type: str, message: str) -> dict[str, Any]:
    """The line of a case that failed at ``stage``: enough to find the case and the cause, and
    no measurements, so that every summary of the run skips it."""
    logger.warning("case %s failed at %s: %s: %s", request.case_id, stage, error_type, message)
    return {
        "case_id": request.case_id,
        "prompt": request.prompt,
        "target_new": request.target_new,
        "target_true": request.target_true,
        "failed": {"stage": stage, "error": error_type, "message": message},
    }


def _error_failure(request: EditRequest, stage: str, error: Exception) -> dict[str, Any]:
    return _failure(request, stage, type(error).__name__, str(error))


def is_failed(record: dict[str, Any]) -> bool:
    """Whether a line of ``cases.jsonl`` is a failed case (no measurements)."""
    return "failed" in record


def _fail_groups(requests: list[EditRequest], failed: dict[str, dict[str, Any]]) -> list[EditRequest]:
    """The requests still to edit once those in ``failed`` (case id -> line) are left out.

    The rewrites of a group are one multi-hop case, edited whole or not at all: a group with a
    failed rewrite fails as a whole, and its other rewrites get lines in ``failed`` naming it.
    """
    broken = {r.group: r.case_id for r in requests if r.case_id in failed and r.group is not None}
    ready = []
    for request in requests:
        if request.case_id in failed:
            continue
        if request.group in broken:
            cause = failed[broken[request.group]]["failed"]
            failed[request.case_id] = _failure(
                request, cause["stage"], cause["error"], f"case {broken[request.group]} of its group {request.group!r} failed: {cause['message']}"
            )
        else:
            ready.append(request)
    return ready


class _Cases:
    """Where the loop writes finished cases: ``cases.jsonl`` (or a shard's file), and the live
    TensorBoard view when there is one."""

    def __init__(self, writer: JsonlWriter, board: RunBoard | None) -> None:
        self.writer, self.board = writer, board

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        if self.board is not None:
            self.board.add(record)

    def close(self) -> None:
        self.writer.close()


class EditRun:
    """One run: an editor, its config, requests, a mode, and an output folder.

    ``model_id`` and ``data`` are the model and the data as the user named them (``edit.py
    --model`` and ``--data``), recorded in ``summary.json`` and in saved edits; without them the
    run records the name the model was loaded under and no data file.
    """

    def __init__(
        self,
        model,
        tokenizer,
        editor: Editor,
        editor_config: EditorConfig,
        requests: Sequence[EditRequest],
        out_dir: str | Path,
        mode: str = "single",
        edits_per_call: int = 1,
        eval_config: EvalConfig | None = None,
        progress: bool = True,
        info: dict[str, Any] | None = None,
        checkpoints: Sequence[int] | None = None,
        general: "GeneralConfig | None" = None,
        budget_threshold: float = 0.1,
        model_id: str | None = None,
        data: str | None = None,
        sequential_scoring: str = "final",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if sequential_scoring not in SEQUENTIAL_SCORING:
            raise ValueError(f"sequential_scoring must be one of {SEQUENTIAL_SCORING}, got {sequential_scoring!r}")
        if mode != "single" and edits_per_call > 1 and not editor.supports_batch:
            raise ValueError(
                f"editor {editor.name!r} edits one request per call and cannot batch: use --edits_per_call 1 "
                f"(in sequential mode its edits still accumulate, one call each)"
            )
        self.general = general if general is not None and general.tasks else None
        if self.general is not None and mode == "single":
            raise ValueError("the general-ability suite needs --mode sequential (scored at checkpoints) or --mode batch (scored after the first call); in single mode every edit is reverted")
        self.shard = current_shard()
        if self.shard.active and (mode == "sequential" or self.general is not None):
            raise ValueError("sharded runs (torchrun) split independent cases: use --mode single or batch, without the general-ability suite")
        self.model, self.tokenizer = model, tokenizer
        self.editor, self.editor_config = editor, editor_config
        self.requests = list(requests)
        self.dir = RunDir(out_dir)
        self.out = self.dir.root
        self.mode = mode
        self.edits_per_call = 1 if mode == "single" else max(1, edits_per_call)
        self.eval = eval_config or EvalConfig()
        self.progress = progress
        self.device = model_device(model)
        self.cases_path = self.dir.cases
        self.checkpoints_path = self.dir.checkpoints
        self.checkpoints = checkpoint_schedule(len(self.requests), checkpoints)
        self.budget_threshold = budget_threshold
        self.info = dict(info or {})  # extra run facts for summary.json (e.g. skipped records)
        self.sequential_scoring = sequential_scoring
        if mode == "sequential":
            self.info["sequential_scoring"] = sequential_scoring
        self.model_id, self.data = model_id, data
        self.provenance: dict[str, Any] | None = None  # found by run(), on the unedited model
        self._board: RunBoard | None = None
        self._bars: list[Any] = []  # the progress bars open now, innermost last

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with join_rule(self.eval.join):  # how prompts and targets are joined, for editing and scoring alike
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.dir.prepare(shards=self.shard.active)
        if self.shard.is_main:
            self._merge_shards()
        self.shard.barrier()  # every process reads the same finished cases before any writes
        finished = read_jsonl(self.cases_path)
        done = {r["case_id"] for r in finished}
        todo = [r for r in self.requests if r.case_id not in done]
        if done:
            logger.info("resuming: %d of %d cases already in %s", len(self.requests) - len(todo), len(self.requests), self.cases_path)
        started = time.perf_counter()
        self.provenance = run_provenance(self.model, self.model_id, self.data)
        self.shard.barrier()
        # Scalars as each case finishes; a sharded run's need every process, so it writes them at the end.
        if not self.shard.active:
            wanted = {r.case_id for r in self.requests}
            self._board = RunBoard(self.dir.tensorboard, [r for r in finished if r["case_id"] in wanted])
        try:
            writer = _Cases(JsonlWriter(self._shard_path() if self.shard.active else self.cases_path), self._board)
            try:
                if todo:
                    # One-time work on the unedited model (key statistics, sampled prefixes), before
                    # a resumed sequential run re-applies its saved edits; timed on its own.
                    with measure(self.device) as cost:
                        try:
                            self.editor.prepare(self.model, self.tokenizer, self.editor_config)
                        except (KeyError, ValueError) as error:
                            reason = error.args[0] if isinstance(error, KeyError) and error.args else error  # str(KeyError) adds quotes
                            raise EditorSetupError(f"{self.editor.name} cannot edit this model as configured: {reason}") from error
                    self.info["prepare_seconds"] = round(cost.seconds, 3)
                    getattr(self, f"_run_{self.mode}")(todo, writer)
            finally:
                writer.close()
            self.shard.barrier()
            if self.shard.is_main:
                self._merge_shards()
            self.shard.barrier()
            return self.write_summary(time.perf_counter() - started)
        finally:
            if self._board is not None:
                self._board.close()
                self._board = None

    def cases_done(self) -> int:
        """How many of the run's cases have their line in ``cases.jsonl`` (or a shard's file) now."""
        wanted = {r.case_id for r in self.requests}
        files = [self.cases_path, *sorted(self.dir.shards.glob("cases-*.jsonl"))] if self.dir.shards.is_dir() else [self.cases_path]
        return len({r["case_id"] for path in files for r in read_jsonl(path)} & wanted)

    def _shard_path(self, rank: int | None = None) -> Path:
        return self.dir.shard_cases(self.shard.rank if rank is None else rank)

    def _merge_shards(self) -> None:
        """Fold the per-process case files of a sharded run into ``cases.jsonl``, in data order."""
        self.dir.merge_shards([r.case_id for r in self.requests])

    @contextmanager
    def _bar(self, total: int, desc: str, initial: int = 0) -> Iterator[Any]:
        """A progress bar over ``total`` cases, ``initial`` of them done before (a resumed run)."""
        bar = tqdm(total=total, initial=initial, desc=desc, unit="case", disable=not self.progress, dynamic_ncols=True)
        self._bars.append(bar)
        try:
            yield bar
        finally:
            self._bars.remove(bar)
            bar.close()

    def _stage(self, stage: str) -> None:
        """Show what the case at hand is going through beside the innermost progress bar."""
        if self.progress and self._bars:
            self._bars[-1].set_postfix_str(stage)

    def _edit(self, requests: list[EditRequest]) -> tuple[list[Edit], float, float]:
        """Apply one unit: one call, or one call per request for editors that cannot batch (a
        group's rewrites). Returns the applied edits, seconds per request and peak memory."""
        calls = [requests] if self.editor.supports_batch or len(requests) == 1 else [[r] for r in requests]
        edits: list[Edit] = []
        before = model_state(self.model)
        self._stage("editing")
        try:
            with measure(self.device) as cost:
                for call in calls:
                    edits.append(self.editor.apply(self.model, self.tokenizer, call, self.editor_config))
        except BaseException as error:
            for edit in reversed(edits):
                edit.revert(self.model)
            # An interrupt (Ctrl-C) stops the run as it is; only an editor's own error is checked.
            if isinstance(error, Exception) and not isinstance(error, FATAL_ERRORS) and model_state(self.model) != before:
                cases = ", ".join(r.case_id for r in requests)
                raise ModelLeftChangedError(
                    f"{self.editor.name} failed on case {cases} ({type(error).__name__}: {error}) and left the model changed; "
                    f"the run stops here (finished cases are kept in {self.cases_path})"
                ) from error
            raise
        for edit in edits:
            self._record_provenance(edit)
        return edits, cost.seconds / len(requests), cost.peak_memory_mb

    def _record_provenance(self, edit: Edit) -> None:
        """Give an edit the model id as the user named it and the run's provenance, dated now."""
        if edit.made_for is not None and self.model_id is not None:
            edit.made_for = dataclasses.replace(edit.made_for, name=self.model_id)
        if self.provenance is not None:
            edit.provenance = {**self.provenance, "date": utc_now()}

    def _run_single(self, todo: list[EditRequest], writer: _Cases) -> None:
        self._run_batch(todo, writer)

    def _run_batch(self, todo: list[EditRequest], writer: _Cases) -> None:
        recorded = {c["edits"] for c in read_jsonl(self.checkpoints_path)}
        if self.general is not None and 0 not in recorded:
            self._write_checkpoint(0, [], {})
            recorded.add(0)
        units = edit_units(todo, self.edits_per_call)
        done = len(self.requests) - len(todo)  # cases an earlier invocation finished
        if self.shard.active:  # every world-th call, so each process gets a fair share
            units = units[self.shard.rank :: self.shard.world]
            done = 0
        with self._bar(done + sum(len(u) for u in units), f"{self.editor.name} ({self.mode})", initial=done) as bar:
            for batch in units:
                lines: dict[str, dict[str, Any]] = {}  # case id -> its line of cases.jsonl
                pre = {}
                for request in batch:
                    raw, failure = self._measure(request, "pre")
                    if failure is None:
                        pre[request.case_id] = raw
                    else:
                        lines[request.case_id] = failure
                ready = _fail_groups(batch, lines)
                if ready:
                    self._edit_and_score(ready, pre, lines, recorded)
                for request in batch:
                    writer.write(lines[request.case_id])
                bar.update(len(batch))

    def _measure(self, request: EditRequest, stage: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(measurements, None)``, or ``(None, the case's failed line)`` when measuring raises
        anything but a fatal error (those stop the run)."""
        self._stage(f"{stage}-scoring")
        # The generation steps are named only where a progress bar shows them.
        shown = {"on_step": lambda step: self._stage(f"{stage}-scoring: {step}")} if self.progress else {}
        try:
            return measure_case(self.model, self.tokenizer, request, self.eval, **shown), None
        except FATAL_ERRORS:
            raise
        except Exception as error:
            return None, _error_failure(request, stage, error)

    def _edit_and_score(self, ready: list[EditRequest], pre: dict[str, Any], lines: dict[str, dict[str, Any]], recorded: set[int]) -> None:
        """Edit ``ready`` in one unit, score each request after editing, and revert, whatever
        fails; every request gets its line in ``lines``."""
        try:
            edits, seconds, memory = self._edit(ready)
        except FATAL_ERRORS:
            raise
        except Exception as error:  # _edit has reverted whatever it applied
            for request in ready:
                lines[request.case_id] = _error_failure(request, "edit", error)
            return
        try:
            scored = []
            for request in ready:
                post, failure = self._measure(request, "post")
                if failure is not None:
                    lines[request.case_id] = failure
                    continue
                lines[request.case_id] = _record(request, pre[request.case_id], post, seconds=seconds, peak_memory_mb=memory, edits_per_call=len(ready))
                scored.append(lines[request.case_id])
            # The general suite runs once, on the model carrying the first call's edits.
            if self.general is not None and len(recorded) == 1:
                self._write_checkpoint(len(ready), scored, {"edit_seconds": seconds * len(ready)})
                recorded.add(len(ready))
        finally:
            for edit in reversed(edits):
                edit.revert(self.model)

    def _run_sequential(self, todo: list[EditRequest], writer: _Cases) -> None:
        scored_before = len(self.requests) - len(todo)  # by an invocation stopped while scoring (step 3)
        # 1. Unedited measurements of every case (needed as the locality reference).
        pre_path = self.dir.pre
        pre = {r["case_id"]: r["raw"] for r in read_jsonl(pre_path) if "raw" in r}
        edits_dir = self.dir.edits
        saved = self.dir.saved_edits()
        if saved and any(r.case_id not in pre for r in todo):
            raise RuntimeError(f"{self.out}: saved edits exist but unedited measurements are incomplete; start a fresh --out")
        pre_writer = JsonlWriter(pre_path)
        failed: dict[str, dict[str, Any]] = {}  # case id -> its line, for cases that cannot be edited
        try:
            with self._bar(len(todo), "pre-edit scores") as bar:
                for request in todo:
                    if request.case_id not in pre:
                        raw, failure = self._measure(request, "pre")
                        if failure is not None:
                            failed[request.case_id] = failure
                        else:
                            pre[request.case_id] = raw
                            pre_writer.write({"case_id": request.case_id, "raw": raw})
                    bar.update()
        finally:
            pre_writer.close()
        todo = _fail_groups(todo, failed)
        for line in failed.values():
            writer.write(line)
        self._pre = pre
        recorded = {c["edits"] for c in read_jsonl(self.checkpoints_path)}
        if self.general is not None and 0 not in recorded:
            self._write_checkpoint(0, [], {})
            recorded.add(0)
        # 2. Apply the edits in order: first re-apply those an interrupted run saved, then make
        # the rest. Checkpoints are scored as the count of edited requests passes them, also
        # while replaying (a run stopped between an edit and its checkpoint scores it on resume).
        by_id = {r.case_id: r for r in self.requests}
        order = {r.case_id: i for i, r in enumerate(self.requests)}
        immediate = self.sequential_scoring == "immediate"
        applied: list[Edit] = []
        costs: dict[str, tuple[float, float]] = {}
        edited: list[EditRequest] = []
        final = len(self.requests)
        try:
            unscored = {r.case_id for r in todo}
            for directory in saved:
                edit = Edit.load(directory).apply(self.model)
                applied.append(edit)
                for case_id, cost in edit.info.get("cost", {}).items():
                    costs[case_id] = tuple(cost)
                unit = [by_id[c] for c in edit.case_ids if c in by_id]
                if immediate:  # a case whose edit was saved but not scored: scored right after it now
                    self._score_post([r for r in unit if r.case_id in unscored], pre, costs, len(edited) + len(unit), order, writer)
                self._advance(edited, unit, recorded, costs, final)
            if saved:
                logger.info("re-applied %d saved edits from %s", len(saved), edits_dir)
            made = {r.case_id for r in edited}
            pending = [r for r in todo if r.case_id not in made]
            with self._bar(len(edited) + len(pending), f"{self.editor.name} (sequential)", initial=len(edited)) as bar:
                for unit in edit_units(pending, self.edits_per_call):
                    try:
                        edits, seconds, memory = self._edit(unit)
                    except FATAL_ERRORS:
                        raise
                    except Exception as error:  # _edit has reverted this unit; earlier edits stay
                        for r in unit:
                            failed[r.case_id] = _error_failure(r, "edit", error)
                            writer.write(failed[r.case_id])
                        bar.update(len(unit))
                        continue
                    for r in unit:
                        costs[r.case_id] = (seconds, memory)
                    for edit in edits:
                        applied.append(edit)
                        edit.info["cost"] = {c: costs[c] for c in edit.case_ids if c in costs}
                        self.dir.save_edit(edit, len(applied))
                    bar.update(len(unit))
                    if immediate:
                        self._score_post(unit, pre, costs, len(edited) + len(unit), order, writer)
                    self._advance(edited, unit, recorded, costs, final)
            edited.sort(key=lambda r: order[r.case_id])
            if immediate:  # each case was scored right after its edit: the final model's retention remains
                if edited and len(edited) not in recorded:
                    self._retention_checkpoint(edited, recorded, costs)
                return
            # 3. Score every case on the model carrying all edits (retention), then the last checkpoint.
            # Failed edits are not applied, so the model carries len(edited) edits.
            scoring = [r for r in todo if r.case_id not in failed]
            with self._bar(scored_before + len(scoring), "post-edit scores", initial=scored_before) as bar:
                self._score_post(scoring, pre, costs, len(edited), order, writer, bar)
            if edited and len(edited) not in recorded:
                wanted = {r.case_id for r in self.requests}
                finished = [r for r in read_jsonl(self.cases_path) if r["case_id"] in wanted]
                self._write_checkpoint(len(edited), finished, {"edit_seconds": sum(c[0] for c in costs.values() if c[0] is not None)})
                recorded.add(len(edited))
        finally:
            for edit in reversed(applied):
                edit.revert(self.model)

    def _advance(self, edited: list[EditRequest], unit: list[EditRequest], recorded: set[int], costs, final: int) -> None:
        """Count a unit as edited; score a checkpoint it reaches (the last one is scored with the
        final post-edit measurements instead)."""
        before = len(edited)
        edited.extend(unit)
        now = len(edited)
        if now == final or now in recorded or not any(before < c <= now for c in self.checkpoints):
            return
        self._retention_checkpoint(edited, recorded, costs)

    def _score_post(
        self, requests: list[EditRequest], pre: dict[str, Any], costs, edits_applied: int, order: dict[str, int], writer: _Cases, bar: Any = None
    ) -> None:
        """Score ``requests`` on the model as it is now (carrying ``edits_applied`` edits) and write
        their records: all cases at the end of a run (``sequential_scoring="final"``), or the
        cases of the unit just edited (``"immediate"``, as EasyEdit's sequential evaluation)."""
        for request in requests:
            post, failure = self._measure(request, "post")
            if failure is not None:
                writer.write(failure)
            else:
                seconds, memory = costs.get(request.case_id, (None, None))
                writer.write(_record(request, pre[request.case_id], post, seconds=seconds, peak_memory_mb=memory, edits_applied=edits_applied, edit_index=order[request.case_id]))
            if bar is not None:
                bar.update()

    def _retention_checkpoint(self, edited: list[EditRequest], recorded: set[int], costs) -> None:
        """Score every case edited so far on the model as it is now, with the general suite: the
        checkpoint at ``len(edited)`` edits."""
        now = len(edited)
        records = []
        with self._bar(now, f"retention at {now} edits") as bar:
            for request in edited:
                try:
                    post = measure_case(self.model, self.tokenizer, request, self.eval)
                except FATAL_ERRORS:
                    raise
                except Exception as error:  # the final scoring records the case's failure
                    logger.warning("retention at %d edits leaves out case %s: %s: %s", now, request.case_id, type(error).__name__, error)
                else:
                    records.append(_record(request, self._pre[request.case_id], post))
                bar.update()
        self._write_checkpoint(now, records, {"edit_seconds": sum(costs[r.case_id][0] for r in edited if r.case_id in costs)})
        recorded.add(now)

    def _unedited_general_path(self) -> Path:
        """Where the unedited model's general-ability scores are kept: every run on the same
        weights, tokenizer and suite settings shares them (they cost minutes on a CPU)."""
        import dataclasses
        import hashlib
        from importlib.metadata import PackageNotFoundError, version

        from factedit.models import model_fingerprint

        from factedit.models import cache_dir

        try:
            engine = version("lm_eval")
        except PackageNotFoundError:
            engine = "none"
        key = json.dumps(
            {
                "model": model_fingerprint(self.model),
                "tokenizer": [getattr(self.tokenizer, "name_or_path", ""), len(self.tokenizer)],
                "suite": dataclasses.asdict(self.general),
                "lm_eval": engine,
                "stored": 2,  # what the file holds: 2 = scores, item scores and chance levels
            },
            sort_keys=True,
            default=str,
        )
        return cache_dir() / "general-unedited" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def _write_checkpoint(self, edits: int, records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        """Retention scores of ``records`` and the general-ability suite, on the model as it is now."""
        started = time.perf_counter()
        metrics = RunMetrics()
        for record in records:
            metrics.update(record)
        retention = {k: v for k, v in metrics.summary().items() if not k.startswith("pre_") and "seconds" not in k and "memory" not in k}
        values = case_values(records)  # per-case scores, for the standard error of each retention score
        errors = {k: standard_error(values[k]) for k in retention if k in values}
        general: dict[str, Any] = {}
        paired: dict[str, Any] = {}  # item-level scores and chance levels, for the budget's paired tests
        general_seconds = 0.0
        cached = False
        if self.general is not None:
            from .general import run_general

            tick = time.perf_counter()
            stored = self._unedited_general_path() if edits == 0 else None
            if stored is not None and stored.is_file():
                saved, cached = json.loads(stored.read_text()), True
            else:
                run = run_general(self.model, self.tokenizer, self.general)
                saved = {"scores": run.scores, "item_scores": run.item_scores, "chance": run.chance}
                if stored is not None:
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    staging = stored.with_suffix(f".{os.getpid()}.tmp")
                    staging.write_text(json.dumps(saved))
                    os.replace(staging, stored)
            general = saved["scores"]
            paired = {key: saved[key] for key in ("item_scores", "chance") if saved[key]}
            general_seconds = time.perf_counter() - tick
            logger.info("general abilities at %d edits%s: %s", edits, " (unedited model, cached)" if cached else "", json.dumps(general))
        line = {
            "edits": edits,
            **extra,
            "retention": retention,
            "retention_stderr": {k: v for k, v in errors.items() if v is not None},
            "retention_n": {k: len(values[k]) for k in retention if k in values},
            "general": general,
            **{f"general_{key}": value for key, value in paired.items()},
            "general_seconds": round(general_seconds, 3),
            **({"general_cached": True} if cached else {}),
            "checkpoint_seconds": round(time.perf_counter() - started, 3),
        }
        self.dir.append(self.checkpoints_path, line)
        return line

    # -- outputs -------------------------------------------------------------------------------
    def write_summary(self, wall_seconds: float) -> dict[str, Any]:
        records = read_jsonl(self.cases_path)
        wanted = {r.case_id for r in self.requests}
        records = [r for r in records if r["case_id"] in wanted]
        failed = [r for r in records if is_failed(r)]
        scored = [r for r in records if not is_failed(r)]
        metrics = RunMetrics()
        for record in scored[self.shard.rank :: self.shard.world]:
            metrics.update(record)
        flat = metrics.summary()  # reduced over all processes of a sharded run
        summary = {
            "editor": self.editor.name,
            "mode": self.mode,
            "edits_per_call": self.edits_per_call,
            "cases": len(records),
            "failed_cases": len(failed),  # the metrics are over the other cases
            "failed_case_ids": [r["case_id"] for r in failed],
            "wall_seconds_this_invocation": wall_seconds,
            "metrics": flat,
            "protocols": protocols_of(flat),
            **self.info,
            "provenance": self.provenance if self.provenance is not None else run_provenance(self.model, self.model_id, self.data),
        }
        if self.shard.active:
            summary["processes"] = self.shard.world
            if not self.shard.is_main:
                return summary
        if read_jsonl(self.checkpoints_path):
            summary.update(self._checkpoint_outputs(summary))
        self.dir.write_summary(summary)
        self._tensorboard(scored, flat)
        return summary

    def settings(self) -> dict[str, Any]:
        """The run's settings by dotted name, as TensorBoard's HParams view lists them."""
        found: dict[str, Any] = {
            "editor": self.editor.name,
            "mode": self.mode,
            "edits_per_call": self.edits_per_call,
            "model": self.model_id,
            "data": self.data,
            "cases": len(self.requests),
        }
        found.update({f"editor.{k}": v for k, v in self.editor_config.to_dict().items()})
        found.update({f"eval.{k}": v for k, v in dataclasses.asdict(self.eval).items()})
        return found

    def _checkpoint_outputs(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Curves (PNG), a markdown table, TensorBoard scalars by number of edits, and the edit
        budget when the general suite ran; returns what goes into summary.json."""
        from . import compare

        checkpoints = compare.read_checkpoints(self.checkpoints_path)
        run = compare.Run(label=self.editor.name, path=self.out, summary=summary, checkpoints=checkpoints)
        out: dict[str, Any] = {"checkpoints": [c["edits"] for c in checkpoints]}
        budgets = {}
        if checkpoints[0]["edits"] == 0 and checkpoints[0].get("general"):
            out["edit_budget"] = budgets[run.label] = compare.edit_budget(checkpoints, threshold=self.budget_threshold)
        compare.plot_runs([run], self.dir.curves, threshold=self.budget_threshold, metrics=compare.retention_keys([run]), width=compare.DOUBLE_COLUMN)
        self.dir.checkpoints_md.write_text(compare.markdown_table([run], budgets))
        compare.write_tensorboard(checkpoints, self.dir.tensorboard)
        return out

    def _tensorboard(self, records: list[dict[str, Any]], flat: dict[str, float]) -> None:
        """End the TensorBoard view: the final metrics and the settings. Per-case scalars were
        written as the cases finished, except in a sharded run, whose cases are written now."""
        board, own = self._board, self._board is None
        if own:
            board = RunBoard(self.dir.tensorboard, running=False)
            for record in records:
                board.add(record)
        try:
            board.finish(self.settings(), flat)
        finally:
            if own:
                board.close()
