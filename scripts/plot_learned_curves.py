"""Validation curves of learned-editor training runs, from their TensorBoard logs, as one PNG.

For each run folder (``runs/train/<name>``, holding ``version_*/events.out.tfevents.*``), the
validation edit success, rephrase success and locality are plotted against the training step,
one panel per run (all versions of a run, i.e. a resumed run, on the same axes).

    python scripts/plot_learned_curves.py runs/train/mend-zsre-quick runs/train/ke-zsre-quick ... --out runs/train/validation_curves.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

METRICS = (("val/edit_success", "edit success"), ("val/rephrase_success", "rephrase success"), ("val/locality", "locality"))


def read_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` over every version of one run, sorted by step (a step
    logged twice, by a resumed run, keeps its latest value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {tag: {} for tag, _ in METRICS}
    for version in sorted(run.glob("version_*"), key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else 0):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
        for tag in curves:
            if tag in tags:
                curves[tag].update({event.step: event.value for event in events.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def plot(runs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        curves = read_curves(run)
        for tag, label in METRICS:
            if curves[tag]:
                steps, values = zip(*curves[tag])
                ax.plot(steps, values, marker="o", label=label)
        ax.set_title(run.name, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if not any(curves.values()):
            ax.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    figure.suptitle("validation on held-out training edits", fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding version_*/ TensorBoard logs")
    parser.add_argument("--out", type=Path, default=Path("runs/train/validation_curves.png"))
    args = parser.parse_args()
    missing = [str(run) for run in args.runs if not any(run.glob("version_*"))]
    if missing:
        parser.error(f"no TensorBoard logs (version_*/) in: {', '.join(missing)}")
    print(plot(args.runs, args.out))


if __name__ == "__main__":
    main()
