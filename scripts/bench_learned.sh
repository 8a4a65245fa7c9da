#!/usr/bin/env bash
# Trained versus untrained learned editors (MEND, KE, SERAC) on the default model.
# Each editor is trained with its quick config on zsRE's 1k training split (timed), then scored
# on the first LIMIT records of zsRE's GPT-4 portability evaluation file, which training never
# sees, with the trained network and with the same network untrained. Prints one table.
# MEND's untrained network is the one its training starts from: factor statistics warmed up on
# training edits, no step (train.py with --trainer.max_steps 0).
#   bash scripts/bench_learned.sh [METHODS...]        (default: mend ke serac; LIMIT=200)
# Runs already finished are not repeated (training resumes from its last checkpoint, evaluation
# from its cases.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
methods=${*:-mend ke serac}
data=${DATA:-../shared/data/zsre/zsre_mend_eval_portability_gpt4.json}
limit=${LIMIT:-200}
out=${OUT:-runs/bench_learned}
mkdir -p "$out"
for m in $methods; do
  trained=runs/train/$m-zsre-quick/editor
  if [ ! -f "$trained/editor.safetensors" ]; then
    start=$(date +%s)
    ckpt=()
    [ -f "runs/train/$m-zsre-quick/checkpoints/last.ckpt" ] && ckpt=(--ckpt_path last)
    python train.py fit --config "configs/$m/zsre-quick.yaml" "${ckpt[@]}" > "$out/train_$m.log" 2>&1
    echo "$(( $(date +%s) - start ))" > "$out/train_$m.seconds"
  fi
  untrained=()
  if [ "$m" = mend ]; then  # the only editor with a warm-up
    warmed=runs/train/$m-zsre-warmed
    [ -f "$warmed/editor.safetensors" ] || python train.py fit --config "configs/$m/zsre-quick.yaml" --trainer.max_steps 0 \
      --model.export_dir "$warmed" > "$out/warmup_$m.log" 2>&1
    untrained=(--editor.checkpoint "$warmed")
  fi
  for kind in untrained trained; do
    extra=("${untrained[@]}")
    [ "$kind" = trained ] && extra=(--editor.checkpoint "$trained")
    python edit.py --editor "$m" "${extra[@]}" --data "$data" --limit "$limit" --eval.fluency false --progress false \
      --out "$out/${m}_$kind" > "$out/${m}_$kind.log" 2>&1
  done
done
python - "$out" $methods <<'PY'
import json, sys
from pathlib import Path
out, methods = Path(sys.argv[1]), sys.argv[2:]
keys = ("reliability", "generalization", "locality", "portability", "median_seconds_per_edit", "peak_memory_mb")
print(f"{'editor':<18}" + "".join(f"{k[:14]:>15}" for k in keys) + f"{'train min':>11}")
for m in methods:
    seconds = out / f"train_{m}.seconds"
    minutes = f"{int(seconds.read_text()) / 60:.1f}" if seconds.is_file() else "-"
    for kind in ("untrained", "trained"):
        summary = json.loads((out / f"{m}_{kind}" / "summary.json").read_text())["metrics"]
        print(f"{m + ' ' + kind:<18}" + "".join(f"{summary.get(k, float('nan')):>15.3f}" for k in keys) + f"{minutes if kind == 'trained' else '':>11}")
PY
