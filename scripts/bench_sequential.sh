#!/usr/bin/env bash
# Sequential editing on the default model: edits accumulate, and at checkpoints every edit made
# so far is scored again together with the general-ability suite; then one comparison of all
# methods (curves, tables, edit budget).
#   bash scripts/bench_sequential.sh [METHODS...]     (default: ft_m rome memit; "all": every registered editor)
# Settings by environment: LIMIT (edits, 200), CHECKPOINTS ([10,50,100,200]), TASKS
# ([hellaswag,arc_easy,piqa,mmlu,wikitext]), TASK_LIMIT (items per task, 100), TASK_LIMITS
# (per-task overrides, {wikitext: 3}: three articles, about 15k tokens), PARALLEL (runs at once,
# 1; with more, each run uses one thread), GENERATION (generation-based scoring of every case,
# false: it adds about a third to the scoring time), CHAT (--general.chat_template for the whole
# suite, off), SCORING (--sequential_scoring: final, or immediate as EasyEdit), and for the learned
# editors their trained networks: CHECKPOINT_MEND, CHECKPOINT_KE, CHECKPOINT_ENN, CHECKPOINT_SERAC
# (a folder train.py exported; without one the untrained network edits). Safety tasks go in TASKS,
# e.g. TASKS="[hellaswag,arc_easy,piqa,wikitext,truthfulqa_mc1,advbench,xstest]". Runs resume
# where they stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
methods=${*:-ft_m rome memit}
if [ "$methods" = "all" ]; then
  methods=$(python -c "from factedit.editors.registry import available_editors; print(' '.join(available_editors()))")
fi
data=${DATA:-../shared/data/counterfact/counterfact_test.json}
limit=${LIMIT:-200}
checkpoints=${CHECKPOINTS:-[10,50,100,200]}
tasks=${TASKS:-[hellaswag,arc_easy,piqa,mmlu,wikitext]}
task_limit=${TASK_LIMIT:-100}
task_limits=${TASK_LIMITS:-"{wikitext: 3}"}
parallel=${PARALLEL:-1}
out=${OUT:-runs/sequential}
mkdir -p "$out"
run() {
  local m=$1 start extra=()
  local var="CHECKPOINT_$(echo "$m" | tr '[:lower:]' '[:upper:]')"
  if [ -n "${!var:-}" ]; then extra=(--editor.checkpoint "${!var}"); fi
  start=$(date +%s)
  python edit.py --editor "$m" "${extra[@]}" --mode sequential --sequential_scoring "${SCORING:-final}" --general.chat_template "${CHAT:-off}" --data "$data" --limit "$limit" --checkpoints "$checkpoints" \
    --general.tasks "$tasks" --general.limit "$task_limit" \
    --general.task_limits "$task_limits" --eval.fluency false --eval.generation_scoring "${GENERATION:-false}" --progress false --overwrite "${OVERWRITE:-false}" \
    --out "$out/$m" > "$out/$m.log" 2>&1
  echo "$(( $(date +%s) - start ))" > "$out/$m.seconds"
}
if [ "$parallel" -gt 1 ]; then export OMP_NUM_THREADS=1; fi
running=0
for m in $methods; do
  run "$m" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait -n; running=$((running - 1)); fi
done
wait
for m in $methods; do echo "$m: $(cat "$out/$m.seconds") s wall"; done
python edit.py compare $(for m in $methods; do echo "$out/$m"; done) --out "$out/compare"
