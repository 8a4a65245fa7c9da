"""The edit-and-evaluate loop behind ``edit.py``.

Modes:

* ``single``: each request is edited alone, scored, and reverted before the next.
* ``batch``: ``edits_per_call`` requests are edited in one call, scored, and reverted.

In both, cases are measured in chunks of ``eval.case_batch`` (:mod:`.measuring`): all of a chunk
before editing, then each edit made, kept and reverted (an editor that ``computes_together``, FT,
makes the chunk's independent edits in one :meth:`~factedit.editors.base.Editor.apply_each`
call when ``eval.edit_together``), then all of the chunk again, every row with its own case's
weight change or IKE context (:mod:`.row_edits`); other edits (memories, patches) are measured on
the edited model at once. A stopped run keeps the chunks it finished.
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

Every finished case is appended to ``cases.jsonl`` (flushed and synced), holding the
raw measurements before and after editing; ``summary.json`` is recomputed from that file, so a
run that is stopped and started again with the same command continues where it stopped and ends
with the same summary. The folder's layout and its file handling belong to
:class:`~factedit.evaluation.run_dir.RunDir`, a case's lines to :mod:`.cases`, checkpoints to
:mod:`.checkpoints` and the summary to :mod:`.summary`; this module only runs the loop.

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
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from tqdm.auto import tqdm

from factedit.editors.base import Edit, Editor, EditorConfig, EditRequest
from factedit.editors.core.lm import join_rule, model_device
from factedit.editors.core.provenance import utc_now
from factedit.jsonl import JsonlAppender

from .board import RunBoard
from .cases import (
    FATAL_ERRORS,
    CaseWriter,
    EditorSetupError,
    ModelLeftChangedError,
    case_chunks,
    case_record,
    checkpoint_schedule,
    edit_units,
    error_record,
    fail_groups,
    model_state,
)
from .checkpoints import checkpoint_line
from .config import MODES, SEQUENTIAL_SCORING
from .distributed import current_shard
from .efficiency import measure
from .provenance import run_provenance
from .run_dir import RunDir, read_jsonl
from .measuring import measure_chunk
from .row_edits import RowEdits, can_share_rows, edited_bytes, share_rows
from .scoring import EvalConfig
from .summary import write_summary

if TYPE_CHECKING:
    from factedit.editors.ike.editor import RowContexts

    from .general import GeneralConfig

logger = logging.getLogger(__name__)


def _together(edits: Sequence[Edit]) -> dict[str, int]:
    """A case line's note of how many edits were computed in the call that made its edit, when several."""
    n = max((edit.info.get("computed_together", 1) for edit in edits), default=1)
    return {"edits_computed_together": n} if n > 1 else {}

ROW_EDIT_BYTES = 2**30
"""At most this many bytes of edited weights are held to measure a chunk's edits together
(:class:`RowEdits`); the cases beyond are measured on the edited model at once."""


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
            writer = CaseWriter(JsonlAppender(self._shard_path() if self.shard.active else self.cases_path), self._board)
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
            return write_summary(self, time.perf_counter() - started)
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

    def _edit(self, requests: list[EditRequest], stage: str = "editing") -> tuple[list[Edit], float, float]:
        """Apply one unit: one call, or one call per request for editors that cannot batch (a
        group's rewrites). Returns the applied edits, seconds per request and peak memory."""
        calls = [requests] if self.editor.supports_batch or len(requests) == 1 else [[r] for r in requests]
        edits: list[Edit] = []
        before = model_state(self.model)
        self._stage(stage)
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

    def _run_single(self, todo: list[EditRequest], writer: CaseWriter) -> None:
        self._run_batch(todo, writer)

    def _run_batch(self, todo: list[EditRequest], writer: CaseWriter) -> None:
        """Chunks of ``eval.case_batch`` cases: all measured together before editing; each unit
        edited (or all units at once, :meth:`_edit_together`), its change kept and the model
        reverted; then all measured together, each row with its own case's edit (:func:`share_rows`).
        Edits that cannot be measured per row, and the call the general suite is scored after, are
        measured on the edited model at once."""
        recorded = {c["edits"] for c in read_jsonl(self.checkpoints_path)}
        if self.general is not None and 0 not in recorded:
            self._write_checkpoint(0, [], {})
            recorded.add(0)
        # Chunks are cut from all the run's cases, so that a resumed run measures every case in the
        # same company (the same batches, the same bits) as an uninterrupted one; a chunk that an
        # interruption left partly written is measured whole again, its missing lines written.
        pending = {r.case_id for r in todo}
        chunks = [c for c in case_chunks(edit_units(self.requests, self.edits_per_call), self.eval.case_batch) if any(r.case_id in pending for u in c for r in u)]
        done = len(self.requests) - len(todo)  # cases an earlier invocation finished
        if self.shard.active:  # every world-th chunk, so each process gets a fair share
            chunks = chunks[self.shard.rank :: self.shard.world]
            done = 0
        with self._bar(done + sum(r.case_id in pending for c in chunks for u in c for r in u), f"{self.editor.name} ({self.mode})", initial=done) as bar:
            for chunk in chunks:
                requests = [r for unit in chunk for r in unit]
                lines: dict[str, dict[str, Any]] = {}  # case id -> its line of cases.jsonl
                pre = self._measure_many(requests, "pre", lines)
                deferred: list[tuple[list[EditRequest], list[Edit], float, float]] = []
                units = [ready for ready in (fail_groups(unit, lines) for unit in chunk) if ready]
                together = self._edit_together(units) if self.eval.edit_together and getattr(self.editor, "computes_together", False) and len(units) > 1 else None
                for number, ready in enumerate(units, 1):
                    if together is not None:
                        edits, seconds, memory = together[number - 1]
                        for edit in edits:
                            edit.apply(self.model)
                        self._score_or_keep(ready, edits, seconds, memory, pre, lines, recorded, deferred)
                    else:
                        self._edit_and_score(ready, pre, lines, recorded, deferred, f" {number}/{len(units)}" if len(units) > 1 else "")
                if deferred:
                    self._score_deferred(deferred, pre, lines)
                written = [r for r in requests if r.case_id in pending]
                for request in written:
                    writer.write(lines[request.case_id])
                bar.update(len(written))

    def _measure_many(self, requests: list[EditRequest], stage: str, lines: dict[str, dict[str, Any]], rows: "RowEdits | RowContexts | None" = None) -> dict[str, Any]:
        """:func:`measure_chunk` on this run's model, its stage shown on the progress bar."""
        return measure_chunk(self.model, self.tokenizer, requests, self.eval, stage, lines, rows, self._stage if self.progress else None)

    def _edit_and_score(
        self,
        ready: list[EditRequest],
        pre: dict[str, Any],
        lines: dict[str, dict[str, Any]],
        recorded: set[int],
        deferred: list[tuple[list[EditRequest], list[Edit], float, float]] | None = None,
        number: str = "",
    ) -> None:
        """Edit ``ready`` in one unit, then either keep the edits in ``deferred`` (reverted, to be
        measured with the chunk's other edits) or score each request on the edited model now and
        revert, whatever fails; every request scored now gets its line in ``lines``."""
        try:
            edits, seconds, memory = self._edit(ready, f"editing{number}")
        except FATAL_ERRORS:
            raise
        except Exception as error:  # _edit has reverted whatever it applied
            for request in ready:
                lines[request.case_id] = error_record(request, "edit", error)
            return
        self._score_or_keep(ready, edits, seconds, memory, pre, lines, recorded, deferred)

    def _edit_together(self, units: list[list[EditRequest]]) -> list[tuple[list[Edit], float, float]] | None:
        """The units' edits computed in one :meth:`Editor.apply_each` call (unapplied), each with the
        call's seconds shared out per request and its peak memory; None when the call fails (each
        unit is then edited alone, so that a failing case fails alone)."""
        n = sum(len(unit) for unit in units)
        self._stage(f"editing {n} together")
        try:
            with measure(self.device) as cost:
                made = self.editor.apply_each(self.model, self.tokenizer, units, self.editor_config)
        except FATAL_ERRORS:
            raise
        except Exception as error:
            logger.warning("%s could not compute %d edits together (%s: %s); editing them one at a time", self.editor.name, n, type(error).__name__, error)
            return None
        for edit in made:
            self._record_provenance(edit)
            edit.info["computed_together"] = n
        return [([edit], cost.seconds / n, cost.peak_memory_mb) for edit in made]

    def _score_or_keep(
        self,
        ready: list[EditRequest],
        edits: list[Edit],
        seconds: float,
        memory: float,
        pre: dict[str, Any],
        lines: dict[str, dict[str, Any]],
        recorded: set[int],
        deferred: list[tuple[list[EditRequest], list[Edit], float, float]] | None,
    ) -> None:
        """With ``edits`` applied: keep them in ``deferred`` (reverted) or score ``ready`` now and revert."""
        general_now = self.general is not None and len(recorded) == 1
        if deferred is not None and not general_now and can_share_rows(self.model, edits):
            held = sum(edited_bytes(self.model, e) for _, e, _, _ in deferred) + edited_bytes(self.model, edits)
            if held <= ROW_EDIT_BYTES:
                for edit in reversed(edits):
                    edit.revert(self.model)
                deferred.append((ready, edits, seconds, memory))
                return
        try:
            post = self._measure_many(ready, "post", lines)
            scored = []
            for request in ready:
                if request.case_id in post:
                    lines[request.case_id] = case_record(request, pre[request.case_id], post[request.case_id], seconds=seconds, peak_memory_mb=memory, edits_per_call=len(ready), **_together(edits))
                    scored.append(lines[request.case_id])
            # The general suite runs once, on the model carrying the first call's edits.
            if general_now:
                self._write_checkpoint(len(ready), scored, {"edit_seconds": seconds * len(ready)})
                recorded.add(len(ready))
        finally:
            for edit in reversed(edits):
                edit.revert(self.model)

    def _score_deferred(self, deferred: list[tuple[list[EditRequest], list[Edit], float, float]], pre: dict[str, Any], lines: dict[str, dict[str, Any]]) -> None:
        """Measure the kept edits' cases together, each row with its own unit's edits, and write their lines."""
        requests = [r for ready, _, _, _ in deferred for r in ready]
        per_case = [edits for ready, edits, _, _ in deferred for _ in ready]
        with share_rows(self.model, per_case) as rows:
            post = self._measure_many(requests, "post", lines, rows)
        for ready, edits, seconds, memory in deferred:
            for request in ready:
                if request.case_id in post:
                    lines[request.case_id] = case_record(request, pre[request.case_id], post[request.case_id], seconds=seconds, peak_memory_mb=memory, edits_per_call=len(ready), **_together(edits))

    def _run_sequential(self, todo: list[EditRequest], writer: CaseWriter) -> None:
        scored_before = len(self.requests) - len(todo)  # by an invocation stopped while scoring (step 3)
        # 1. Unedited measurements of every case (needed as the locality reference).
        pre_path = self.dir.pre
        pre = {r["case_id"]: r["raw"] for r in read_jsonl(pre_path) if "raw" in r}
        edits_dir = self.dir.edits
        saved = self.dir.saved_edits()
        if saved and any(r.case_id not in pre for r in todo):
            raise RuntimeError(f"{self.out}: saved edits exist but unedited measurements are incomplete; start a fresh --out")
        pre_writer = JsonlAppender(pre_path)
        failed: dict[str, dict[str, Any]] = {}  # case id -> its line, for cases that cannot be edited
        try:
            pending = {r.case_id for r in todo}
            with self._bar(len(todo), "pre-edit scores") as bar:
                for chunk in self._chunked(self.requests):  # cut from all cases, as in _run_batch
                    if not any(r.case_id in pending and r.case_id not in pre for r in chunk):
                        bar.update(sum(r.case_id in pending for r in chunk))
                        continue
                    failures: dict[str, dict[str, Any]] = {}
                    for case_id, raw in self._measure_many(chunk, "pre", failures).items():
                        if case_id in pending and case_id not in pre:
                            pre[case_id] = raw
                            pre_writer.write({"case_id": case_id, "raw": raw})
                    failed.update({c: line for c, line in failures.items() if c in pending})
                    bar.update(sum(r.case_id in pending for r in chunk))
        finally:
            pre_writer.close()
        todo = fail_groups(todo, failed)
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
                            failed[r.case_id] = error_record(r, "edit", error)
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
            # Every case edited is measured in chunks cut from all of them (as an uninterrupted run
            # cuts them); only the lines still missing are written.
            earlier_failures = {r["case_id"] for r in read_jsonl(self.cases_path) if "failed" in r}
            scoring = [r for r in self.requests if r.case_id not in failed and r.case_id not in earlier_failures]
            missing = {r.case_id for r in todo if r.case_id not in failed}
            with self._bar(scored_before + len(missing), "post-edit scores", initial=scored_before) as bar:
                self._score_post(scoring, pre, costs, len(edited), order, writer, bar, missing)
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
        self,
        requests: list[EditRequest],
        pre: dict[str, Any],
        costs,
        edits_applied: int,
        order: dict[str, int],
        writer: CaseWriter,
        bar: Any = None,
        missing: set[str] | None = None,
    ) -> None:
        """Score ``requests`` on the model as it is now (carrying ``edits_applied`` edits) and write
        their records (only those of ``missing``, when given): all cases at the end of a run
        (``sequential_scoring="final"``), or the cases of the unit just edited (``"immediate"``,
        as EasyEdit's sequential evaluation)."""
        for chunk in self._chunked(requests):
            if missing is not None:
                if not any(r.case_id in missing for r in chunk):
                    continue
            failures: dict[str, dict[str, Any]] = {}
            measured = self._measure_many(chunk, "post", failures)
            chunk = [r for r in chunk if missing is None or r.case_id in missing]
            for request in chunk:
                if request.case_id in failures:
                    writer.write(failures[request.case_id])
                else:
                    seconds, memory = costs.get(request.case_id, (None, None))
                    post = measured[request.case_id]
                    writer.write(case_record(request, pre[request.case_id], post, seconds=seconds, peak_memory_mb=memory, edits_applied=edits_applied, edit_index=order[request.case_id]))
            if bar is not None:
                bar.update(len(chunk))

    def _chunked(self, requests: list[EditRequest]) -> list[list[EditRequest]]:
        """``requests`` in runs of ``eval.case_batch``, measured together on the model as it is."""
        return [requests[i : i + self.eval.case_batch] for i in range(0, len(requests), self.eval.case_batch)]

    def _retention_checkpoint(self, edited: list[EditRequest], recorded: set[int], costs) -> None:
        """Score every case edited so far on the model as it is now, with the general suite: the
        checkpoint at ``len(edited)`` edits."""
        now = len(edited)
        records = []
        with self._bar(now, f"retention at {now} edits") as bar:
            for chunk in self._chunked(edited):
                failures: dict[str, dict[str, Any]] = {}
                measured = self._measure_many(chunk, "retention", failures)
                for request in chunk:
                    if request.case_id in failures:  # the final scoring records the case's failure
                        cause = failures[request.case_id]["failed"]
                        logger.warning("retention at %d edits leaves out case %s: %s: %s", now, request.case_id, cause["error"], cause["message"])
                    else:
                        records.append(case_record(request, self._pre[request.case_id], measured[request.case_id]))
                bar.update(len(chunk))
        self._write_checkpoint(now, records, {"edit_seconds": sum(costs[r.case_id][0] for r in edited if r.case_id in costs)})
        recorded.add(now)

    def _write_checkpoint(self, edits: int, records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        """Retention scores of ``records`` and the general-ability suite, on the model as it is now,
        appended to ``checkpoints.jsonl``."""
        line = checkpoint_line(self.model, self.tokenizer, self.general, edits, records, extra)
        self.dir.append(self.checkpoints_path, line)
        return line

    # -- outputs -------------------------------------------------------------------------------
