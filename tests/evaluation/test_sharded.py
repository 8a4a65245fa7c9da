"""Sharded evaluation: two CPU processes (gloo) split the cases and report what one process does."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from factedit.evaluation.run_dir import read_jsonl

REQUESTS = [
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"),
    ("The capital of France is", "France", "Rome"),
    ("Angola is located in", "Angola", "Europe"),
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome"),
    ("Toko Yasuda plays the", "Toko Yasuda", "piano"),
]


def _run(out: str, mode: str, per_call: int) -> dict:
    from helpers import build_llama, build_tokenizer, make_request

    from factedit.editors import get_editor
    from factedit.evaluation.runner import EditRun
    from factedit.evaluation.scoring import EvalConfig

    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer))
    requests = [make_request(str(i), prompt=p, subject=s, target_new=t) for i, (p, s, t) in enumerate(REQUESTS)]
    editor = get_editor("ft_m")()
    config = editor.config_class(layers=[1], lr=1e-2, steps=5)
    eval_config = EvalConfig(batch_size=8, generation_length=4, generation_prompts=1)
    return EditRun(model, tokenizer, editor, config, requests, out, mode, per_call, eval_config, progress=False).run()


def _worker(rank: int, world: int, port: int, out: str, mode: str, per_call: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        summary = _run(out, mode, per_call)
        with open(os.path.join(out, f"returned-{rank}.json"), "w") as handle:
            json.dump(summary, handle)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timeless(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb")} for r in records]


@pytest.mark.parametrize("mode,per_call", [("single", 1), ("batch", 2)])
def test_two_processes_equal_one(mode, per_call, tmp_path):
    # Both sides run on one thread: a different thread count changes float summation order, and
    # equality here is bit-for-bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _run(str(tmp_path / "one"), mode, per_call)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), mode, per_call), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    # The shards are merged into one cases file, in data order, with the same measurements.
    assert _timeless(read_jsonl(tmp_path / "two" / "cases.jsonl")) == _timeless(read_jsonl(tmp_path / "one" / "cases.jsonl"))
    assert not list((tmp_path / "two" / "shards").glob("*.jsonl"))
    assert two["cases"] == one["cases"] == 5 and two["processes"] == 2
    quality = {k: v for k, v in one["metrics"].items() if "seconds" not in k and "memory" not in k}
    assert set(quality) <= set(two["metrics"])
    for key, value in quality.items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # Every process returns the reduced summary, not its own share's.
    other = json.loads((tmp_path / "two" / "returned-1.json").read_text())
    assert other["metrics"]["reliability"] == pytest.approx(one["metrics"]["reliability"])


def test_sequential_mode_refuses_to_shard(tmp_path, monkeypatch):
    from helpers import build_llama, build_tokenizer, make_request

    from factedit.evaluation import runner as evaluation_runner
    from factedit.editors import get_editor
    from factedit.evaluation.distributed import Shard

    monkeypatch.setattr(evaluation_runner, "current_shard", lambda: Shard(0, 2))
    tokenizer = build_tokenizer()
    editor = get_editor("ft_m")()
    with pytest.raises(ValueError, match="sharded runs"):
        evaluation_runner.EditRun(build_llama(len(tokenizer)), tokenizer, editor, editor.config_class(), [make_request()], tmp_path, "sequential")
