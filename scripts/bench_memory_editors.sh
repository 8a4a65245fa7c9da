#!/usr/bin/env bash
# Patch and memory editors (GRACE, IKE, T-Patcher, CaliNET, WISE) on the default model.
# Single-edit scores on the first LIMIT records of CounterFact's test file and of zsRE's GPT-4
# portability file (token protocol: reliability, generalization, locality, portability;
# probability protocol: ES, PS, NS), seconds per edit and peak memory; then, for the lifelong
# methods (SEQUENTIAL, default: grace wise t_patcher), the same scores of all LIMIT CounterFact
# edits after they were applied one after another. Prints one table.
#   bash scripts/bench_memory_editors.sh [METHODS...]   (default: grace ike t_patcher calinet wise)
# Settings by environment: LIMIT (100), SEQUENTIAL, OUT (runs/bench_memory). Finished runs are not
# repeated and interrupted ones resume (edit.py's own resume).
set -euo pipefail
cd "$(dirname "$0")/.."
methods=${*:-grace ike t_patcher calinet wise}
limit=${LIMIT:-100}
sequential=${SEQUENTIAL:-grace wise t_patcher}
out=${OUT:-runs/bench_memory}
counterfact=../shared/data/counterfact/counterfact_test.json
zsre=../shared/data/zsre/zsre_mend_eval_portability_gpt4.json
mkdir -p "$out"
run() {  # name, extra edit.py arguments...
  local name=$1
  shift
  if [ ! -f "$out/$name/summary.json" ]; then
    python edit.py "$@" --limit "$limit" --eval.fluency false --eval.generation_scoring false --progress false \
      --out "$out/$name" > "$out/$name.log" 2>&1
  fi
}
for m in $methods; do
  run "${m}_counterfact" --editor "$m" --data "$counterfact"
  run "${m}_zsre" --editor "$m" --data "$zsre"
done
for m in $sequential; do
  case " $methods " in *" $m "*) run "${m}_sequential" --editor "$m" --data "$counterfact" --mode sequential --checkpoints "[$limit]" ;; esac
done
python - "$out" $methods <<'PY'
import json, sys
from pathlib import Path
out, methods = Path(sys.argv[1]), sys.argv[2:]
keys = ("reliability", "generalization", "locality", "portability", "es", "ps", "ns", "median_seconds_per_edit", "peak_memory_mb")
print(f"{'run':<24}" + "".join(f"{k[:12]:>13}" for k in keys))
for m in methods:
    for kind in ("counterfact", "zsre", "sequential"):
        folder = out / f"{m}_{kind}"
        if not (folder / "summary.json").is_file():
            continue
        metrics = json.loads((folder / "summary.json").read_text())["metrics"]
        if kind == "sequential":  # the retention scores of every edit, after the last one
            last = [json.loads(line) for line in (folder / "checkpoints.jsonl").read_text().splitlines() if line.strip()][-1]
            metrics = {**metrics, **last["retention"]}
        print(f"{m + ' ' + kind:<24}" + "".join(f"{metrics.get(k, float('nan')):>13.3f}" for k in keys))
PY
