#!/usr/bin/env bash
# Trained versus untrained learned editors (MEND, KE, SERAC, ENN) on the default model.
# Each editor is trained with its quick config on each dataset that has one
# (configs/<editor>/<data>-quick.yaml; zsRE: MEND's 1k training split, CounterFact: EasyEdit's
# training split), timed, then scored with the trained network and untrained on the first LIMIT
# records of an evaluation file training never sees (zsRE: the GPT-4 portability eval file,
# CounterFact: counterfact_test.json). Prints one table and draws the validation curves of every
# training run into runs/train/validation_curves.png (next to the TensorBoard logs).
# Untrained rows: MEND and KE use the network their training starts from (factor statistics warmed
# up on training edits, no step: train.py --trainer.max_steps 0); SERAC has no network (exact-match
# routing, the frozen model as counterfactual model); ENN makes plain gradient steps.
# With zsRE also: trained MEND with 20 edits in one call, and trained SERAC after 100 sequential
# edits (all kept, all scored on the final model).
#   bash scripts/bench_learned.sh [EDITORS...]      (default: mend ke serac enn)
#   DATASETS="zsre counterfact" LIMIT=200 OUT=runs/bench_learned
# Runs already finished are not repeated (training resumes from its last checkpoint, evaluation
# from its cases.jsonl). One thread per process (OMP_NUM_THREADS=1 unless set).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
editors=${*:-mend ke serac enn}
datasets=${DATASETS:-zsre counterfact}
limit=${LIMIT:-200}
out=${OUT:-runs/bench_learned}
mkdir -p "$out"
declare -A eval_data=([zsre]=../shared/data/zsre/zsre_mend_eval_portability_gpt4.json [counterfact]=../shared/data/counterfact/counterfact_test.json)

score() {  # score NAME EDIT_PY_ARGS...: one edit.py run into $out/NAME (a finished one is only re-read)
  local name=$1
  shift
  "$python" edit.py "$@" --eval.fluency false --eval.generation_scoring false --progress false --out "$out/$name" >> "$out/$name.log" 2>&1
}

runs=()
for d in $datasets; do
  for m in $editors; do
    config=configs/$m/$d-quick.yaml
    [ -f "$config" ] || continue
    run=runs/train/$m-$d-quick
    runs+=("$run")
    if [ ! -f "$run/editor/editor.safetensors" ]; then
      start=$(date +%s)
      ckpt=()
      [ -f "$run/checkpoints/last.ckpt" ] && ckpt=(--ckpt_path last)
      "$python" train.py fit --config "$config" "${ckpt[@]}" > "$out/train_$m-$d.log" 2>&1
      echo "$(( $(date +%s) - start ))" > "$out/train_$m-$d.seconds"
    fi
    untrained=()
    if [ "$m" = mend ] || [ "$m" = ke ]; then  # editors whose training starts with a statistics warm-up
      warmed=runs/train/$m-$d-warmed
      [ -f "$warmed/editor.safetensors" ] || "$python" train.py fit --config "$config" --trainer.max_steps 0 --trainer.logger false \
        --model.export_dir "$warmed" > "$out/warmup_$m-$d.log" 2>&1
      untrained=(--editor.checkpoint "$warmed")
    fi
    data=${eval_data[$d]}
    score "${m}_${d}_untrained" --editor "$m" "${untrained[@]}" --data "$data" --limit "$limit"
    score "${m}_${d}_trained" --editor "$m" --editor.checkpoint "$run/editor" --data "$data" --limit "$limit"
    if [ "$d" = zsre ] && [ "$m" = mend ]; then
      score "${m}_${d}_trained_batch20" --editor "$m" --editor.checkpoint "$run/editor" --data "$data" --limit "$limit" --mode batch --edits_per_call 20
    fi
    if [ "$d" = zsre ] && [ "$m" = serac ]; then
      score "${m}_${d}_trained_sequential100" --editor "$m" --editor.checkpoint "$run/editor" --data "$data" --limit 100 --mode sequential
    fi
  done
done
[ ${#runs[@]} -gt 0 ] && "$python" scripts/plot_learned_curves.py "${runs[@]}" --out runs/train/validation_curves.png > /dev/null
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("reliability", "generalization", "locality", "es", "ps", "ns", "pre_ns", "median_seconds_per_edit")
heads = ("rel", "gen", "loc", "ES", "PS", "NS", "NS before", "s/edit")
print(f"{'run':<38}" + "".join(f"{h:>10}" for h in heads) + f"{'train min':>10}")
for summary_path in sorted(out.glob("*/summary.json")):
    name = summary_path.parent.name
    metrics = json.loads(summary_path.read_text())["metrics"]
    editor, data = name.split("_")[:2]
    seconds = out / f"train_{editor}-{data}.seconds"
    minutes = f"{int(seconds.read_text()) / 60:.1f}" if seconds.is_file() and "_trained" in name else ""
    cells = "".join(f"{metrics[k]:>10.3f}" if k in metrics else f"{'-':>10}" for k in keys)
    print(f"{name:<38}{cells}{minutes:>10}")
print("validation curves: runs/train/validation_curves.png")
PY
