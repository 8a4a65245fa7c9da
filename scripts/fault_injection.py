"""Kill ``edit.py`` at random moments and check that rerunning it gives the uninterrupted result.

For each mode (single, batch, sequential) the script first runs ``edit.py`` once, uninterrupted,
on a tiny random LLaMA model and the first cases of the bundled demo CounterFact set, and times
it. Then, ``--trials`` times per mode, it starts the same command into a fresh folder, sends it
SIGKILL at a moment drawn uniformly from that duration (halved until it lands while the run is
still working), and runs the same command again to the end. The final ``cases.jsonl``, ``summary.json`` (and, in sequential mode, ``checkpoints.jsonl``)
must equal the uninterrupted run's, timings and memory figures aside. Last, it starts two runs on
one folder at the same moment: exactly one may run, the other must be refused without writing,
and the folder must end as the uninterrupted run's.

    python scripts/fault_injection.py                  # 20 kills per mode
    python scripts/fault_injection.py --trials 5 --modes sequential --jobs 1

Each process runs on one thread (``OMP_NUM_THREADS=1``), so results are bit-for-bit comparable.
The table it prints has one row per mode: kills, how many landed while the run was still
working, and how many reruns ended equal to the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODE_ARGS = {
    "single": ["--mode", "single"],
    "batch": ["--mode", "batch", "--edits_per_call", "2"],
    "sequential": ["--mode", "sequential", "--checkpoints", "[2,4]"],
}
CASES = 6
# Keys whose values are measurements of time or memory, which differ between any two runs.
VOLATILE = ("seconds", "memory", "wall", "time")
# Keys whose values say when an invocation ran (the provenance's date).
WHEN = ("date",)


def build_tiny_model(directory: Path) -> None:
    """A tiny random LLaMA and a byte-level BPE tokenizer trained on a few sentences, saved."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "The mother tongue of Danielle Darrieux is French. The capital of France is Paris.",
        "Angola is located in Africa. The Eiffel Tower is located in the city of Paris.",
        "Toko Yasuda plays the guitar. Michel Rocard speaks French and English.",
    ]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def command(model: Path, out: Path, mode: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "edit.py"), "--editor", "ft_m", "--model", str(model), "--data", "counterfact-demo",
        "--limit", str(CASES), "--out", str(out), "--editor.layers", "[1]", "--editor.steps", "3",
        "--eval.generation_length", "4", "--progress", "false", *MODE_ARGS[mode],
    ]


def environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FACTEDIT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def stable(value: Any) -> Any:
    """``value`` without the time and memory measurements and the dates."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in WHEN and not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def results(out: Path) -> dict[str, Any]:
    """What a finished run leaves that must not depend on interruptions."""
    found: dict[str, Any] = {}
    for name in ("cases.jsonl", "checkpoints.jsonl"):
        path = out / name
        if path.is_file():
            found[name] = [stable(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    summary = out / "summary.json"
    found["summary.json"] = stable(json.loads(summary.read_text())) if summary.is_file() else None
    return found


def run(cmd: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "a") as handle:
        return subprocess.run(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode


def kill_at(cmd: list[str], env: dict[str, str], delay: float, log: Path) -> bool:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds; True if it was still running then."""
    with open(log, "a") as handle:
        process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True


def concurrent(cmd: list[str], env: dict[str, str], log_dir: Path) -> tuple[list[int], list[str]]:
    """Start two copies of ``cmd`` at once; their exit codes and outputs."""
    logs = [log_dir / f"concurrent-{i}.log" for i in range(2)]
    handles = [open(path, "w") for path in logs]
    try:
        processes = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=h, stderr=subprocess.STDOUT) for h in handles]
        codes = [p.wait() for p in processes]
    finally:
        for handle in handles:
            handle.close()
    return codes, [path.read_text() for path in logs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per mode")
    parser.add_argument("--modes", nargs="+", default=list(MODE_ARGS), choices=list(MODE_ARGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once (each process uses one thread)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(work / "cache")
    model = work / "tiny-llama"
    if not model.is_dir():
        build_tiny_model(model)
    rows = []
    failures = 0
    for mode in args.modes:
        reference_out = work / mode / "reference"
        shutil.rmtree(reference_out, ignore_errors=True)
        reference_out.parent.mkdir(parents=True, exist_ok=True)
        log = work / mode / "log.txt"
        started = time.perf_counter()
        if run(command(model, reference_out, mode), env, log) != 0:
            print(f"{mode}: the uninterrupted run failed; see {log}", file=sys.stderr)
            return 2
        duration = time.perf_counter() - started
        reference = results(reference_out)
        delays = [rng.uniform(0.0, duration) for _ in range(args.trials)]

        def trial(index: int) -> tuple[bool, bool]:
            out = work / mode / f"trial-{index:02d}"
            shutil.rmtree(out, ignore_errors=True)
            trial_log = work / mode / f"trial-{index:02d}.log"
            # A run that finished before its kill (the machine was faster than when the reference
            # was timed) is started afresh with half the delay, so that the kill lands.
            delay, was_running = delays[index], False
            for _ in range(6):
                shutil.rmtree(out, ignore_errors=True)
                if kill_at(command(model, out, mode), env, delay, trial_log):
                    was_running = True
                    break
                delay /= 2
            code = run(command(model, out, mode), env, trial_log)
            same = code == 0 and results(out) == reference
            if not same:
                print(f"{mode} trial {index}: killed at {delay:.1f} s, rerun exit {code}, results differ; see {trial_log}", file=sys.stderr)
            return was_running, same

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = list(pool.map(trial, range(args.trials)))
        landed = sum(w for w, _ in outcomes)
        equal = sum(s for _, s in outcomes)
        failures += args.trials - equal
        # Two runs started at once on one folder: one runs, the other is refused and writes nothing.
        out = work / mode / "concurrent"
        shutil.rmtree(out, ignore_errors=True)
        codes, outputs = concurrent(command(model, out, mode), env, work / mode)
        refused = [text for code, text in zip(codes, outputs) if code != 0]
        one_refused = sorted(c == 0 for c in codes) == [False, True] and all("in use" in text or "lock" in text for text in refused)
        concurrent_ok = one_refused and results(out) == reference
        failures += not concurrent_ok
        rows.append((mode, args.trials, landed, equal, f"{duration:.1f}", "yes" if concurrent_ok else f"NO (exit codes {codes})"))
    print(f"\nfault injection: tiny LLaMA, ft_m, {CASES} demo CounterFact cases, SIGKILL then rerun (seed {args.seed})")
    header = ("mode", "kills", "landed while running", "reruns equal to uninterrupted", "uninterrupted s", "two at once: one refused, result equal")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(str(cell) for cell in row))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
