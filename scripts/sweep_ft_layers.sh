#!/usr/bin/env bash
# How the FT layer defaults for the default model were chosen: FT-M at several layers (and FT-L at
# two L-infinity bounds) on the first 15 demo CounterFact records, fluency off. Prints one line per run.
#   bash scripts/sweep_ft_layers.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/sweep_ft}
cd "$(dirname "$0")/.."
for layer in 2 3 5 10 15 20; do
  python edit.py --editor ft_m --editor.layers "[$layer]" --eval.fluency false --limit 15 --progress false --out "$out/ft_m_L$layer" > /dev/null
done
for bound in 5.0e-04 5.0e-03; do
  python edit.py --editor ft_l --editor.layers "[3]" --editor.norm_constraint "$bound" --eval.fluency false --limit 15 --progress false --out "$out/ft_l_L3_eps$bound" > /dev/null
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
keys = ("reliability", "generalization", "locality", "es", "ps", "ns", "score")
print(f"{'run':<22}" + "".join(f"{k:>16}" for k in keys))
for summary in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    metrics = json.loads(summary.read_text())["metrics"]
    print(f"{summary.parent.name:<22}" + "".join(f"{metrics.get(k, float('nan')):>16.3f}" for k in keys))
PY
