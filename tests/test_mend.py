"""MEND and the machinery learned editors share (gradient pieces, functional edits, checkpoints,
the training loop), on tiny random GPT-2 and LLaMA models."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.edit_datamodule import EditDataModule
from editors import get_editor
from editors.learned import (
    CheckpointError,
    answer_logits,
    answer_nll,
    edited_modules,
    edited_params,
    gradient_pieces,
    pair_batch,
    read_checkpoint,
)
from editors.mend import MENDConfig
from editors.targets import is_transposed, weight_as_out_in
from lit_modules.mend import MENDModule

pytestmark = pytest.mark.usefixtures("isolated_cache")

PAIRS = [("The mother tongue of Danielle Darrieux is", "English"), ("The capital of Italy is", "Rome")]


def _records(n: int) -> list[dict]:
    cities = ["Paris", "Rome", "Africa", "French", "English", "guitar"]
    return [
        {
            "subject": f"Toko {i}",
            "src": f"Toko {i} plays the",
            "rephrase": f"Toko {i} speaks the",
            "alt": cities[i % len(cities)],
            "answers": ["guitar"],
            "loc": "The capital of France is",
            "loc_ans": "Paris",
        }
        for i in range(n)
    ]


@pytest.fixture
def zsre_file(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(_records(6)))
    return path


def test_gradient_pieces_sum_to_the_weight_gradient(tiny_model, tokenizer):
    modules = edited_modules(tiny_model, ["mlp_in", "mlp_out"], [-2, -1])
    batch = pair_batch(tokenizer, PAIRS, "cpu")
    loss, pieces = gradient_pieces(tiny_model, batch, modules)
    params = dict(tiny_model.named_parameters())
    weights = [params[f"{m}.weight"] for m in modules]
    for w in weights:
        w.requires_grad_(True)
    logits, targets, rows = answer_logits(tiny_model, batch)
    per_edit = answer_nll(logits, targets, rows, 2)
    grads = torch.autograd.grad(per_edit.sum(), weights)  # each edit's own gradient, summed
    assert torch.allclose(loss, per_edit.mean().detach())
    for name, grad in zip(modules, grads):
        dense = pieces[name].dense()
        if is_transposed(tiny_model.get_submodule(name)):
            dense = dense.T
        assert torch.allclose(dense, grad, atol=1e-6, rtol=1e-4), name
        # one piece per real token
        assert pieces[name].inputs.shape[0] == int(batch["attention_mask"].sum())


def test_functional_edit_equals_editing_the_weights(tiny_model, tokenizer):
    modules = edited_modules(tiny_model, ["mlp_out"], [1])
    batch = pair_batch(tokenizer, PAIRS, "cpu")
    update = {modules[0]: torch.randn(weight_as_out_in(tiny_model.get_submodule(modules[0])).shape) * 0.1}
    params = edited_params(tiny_model, update)
    functional, _, _ = answer_logits(tiny_model, batch, params)
    name = f"{modules[0]}.weight"
    with torch.no_grad():
        tiny_model.get_parameter(name).copy_(params[name])
    direct, _, _ = answer_logits(tiny_model, batch)
    assert torch.allclose(functional, direct, atol=1e-5)


def test_untrained_mend_is_one_gradient_step(tiny_model, tokenizer, request_factory):
    """At initialisation the transform is the identity: the edit is -alpha * dL/dW."""
    request = request_factory(target_new="Paris")
    config = MENDConfig(roles=["mlp_in", "mlp_out"], layers=[-1], edit_lr_init=0.5)
    modules = edited_modules(tiny_model, config.roles, config.layers)
    _, pieces = gradient_pieces(tiny_model, pair_batch(tokenizer, [(request.prompt, request.target_new)], "cpu"), modules)
    edit = get_editor("mend")().apply(tiny_model, tokenizer, [request], config)
    for name in modules:
        expected = -0.5 * pieces[name].dense()
        got = edit.deltas[f"{name}.weight"].dense()
        if is_transposed(tiny_model.get_submodule(name)):
            got = got.T
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
        assert edit.deltas[f"{name}.weight"].rank == pieces[name].inputs.shape[0]  # stored as factors


def _datamodule(path, tokenizer, **kwargs):
    return EditDataModule(str(path), tokenizer=tokenizer, batch_size=2, val_fraction=0.34, **kwargs)


def test_fast_dev_run(tiny_model, tokenizer, zsre_file, tmp_path):
    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1))
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(zsre_file, tokenizer))
    assert trainer.state.finished
    assert "train/loss" in trainer.callback_metrics and "val/edit_success" in trainer.callback_metrics


def _edit_success(model, tokenizer, requests, config) -> float:
    """Mean teacher-forced token accuracy of the new target on the rephrase, each request alone."""
    scores = []
    editor = get_editor("mend")()
    for request in requests:
        edit = editor.apply(model, tokenizer, [request], config)
        try:
            batch = pair_batch(tokenizer, [(request.rephrase_prompts[0], request.target_new)], "cpu")
            logits, targets, _ = answer_logits(model, batch)
            scores.append((logits.argmax(-1) == targets).float().mean().item())
        finally:
            edit.revert(model)
    return sum(scores) / len(scores)


def test_training_beats_untrained_and_checkpoint_round_trips(tokenizer, zsre_file, tmp_path):
    from conftest import build_llama
    from datamodules.records import load_requests

    model = build_llama(len(tokenizer))
    config = MENDConfig(layers=[-2, -1], rank=16, n_hidden=1, edit_lr_init=1.0e-2)
    requests = load_requests(zsre_file)
    untrained = _edit_success(model, tokenizer, requests, config)

    module = MENDModule(model, config, lr=1.0e-3, lr_lr=5.0e-2)
    trainer = Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=EditDataModule(str(zsre_file), tokenizer=tokenizer, batch_size=1, val_fraction=0.0))
    assert (tmp_path / "editor" / "editor.safetensors").is_file()  # exported at the end of fit

    trained_config = MENDConfig(layers=[-2, -1], rank=16, n_hidden=1, edit_lr_init=1.0e-2, checkpoint=str(tmp_path / "editor"))
    trained = _edit_success(model, tokenizer, requests, trained_config)
    assert trained > untrained + 0.3, (untrained, trained)

    # The exported network is what the editor applies: same update as the trained module's.
    request = requests[0]
    edit = get_editor("mend")().apply(model, tokenizer, [request], trained_config)
    edit.revert(model)
    module.net.eval()
    _, pieces = gradient_pieces(model, pair_batch(tokenizer, [(request.prompt, request.target_new)], "cpu"), module.net.module_names)
    with torch.no_grad():
        expected = module.net.updates(pieces)
    for name, update in expected.items():
        assert torch.allclose(edit.deltas[f"{name}.weight"].dense(), update, atol=1e-6)


def test_checkpoint_errors_name_the_file_and_field(tiny_model, tokenizer, tmp_path):
    config = MENDConfig(layers=[-1], rank=8, n_hidden=1)
    module = MENDModule(tiny_model, config)
    module.configure_model()
    module.export(tmp_path / "ok")

    wrong_arch = MENDConfig(layers=[-1], rank=4, n_hidden=1, checkpoint=str(tmp_path / "ok"))
    with pytest.raises(CheckpointError, match=r"ok.*architecture.*rank"):
        get_editor("mend")().network(tiny_model, tokenizer, wrong_arch)

    corrupt = tmp_path / "bad" / "editor.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad/editor.safetensors"):
        read_checkpoint(corrupt.parent)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing")


def test_lightning_checkpoint_loads_without_unpickling(tiny_model, tokenizer, zsre_file, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    config = MENDConfig(layers=[-1], rank=8, n_hidden=1)
    module = MENDModule(tiny_model, config)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[checkpoint], enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(zsre_file, tokenizer))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("base.") for k in saved["state_dict"]), "the frozen model must not be saved"
    tensors, meta, _ = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert meta["editor"] == "mend" and set(tensors) == set(module.net.state_dict())
    net = get_editor("mend")().network(tiny_model, tokenizer, MENDConfig(layers=[-1], rank=8, n_hidden=1, checkpoint=str(tmp_path / "ckpt" / "last.ckpt")))
    for key, value in module.net.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)


def test_resume_from_last_checkpoint_continues_the_run(tokenizer, zsre_file, tmp_path):
    """A run interrupted after its first epoch and resumed with ckpt_path='last' sees the same
    batches and ends with the same network as an uninterrupted run."""
    from conftest import build_llama
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs, root, ckpt_path=None):
        torch.manual_seed(0)
        module = MENDModule(build_llama(len(tokenizer)), MENDConfig(layers=[-1], rank=8, n_hidden=1), lr=1.0e-3)
        trainer = Trainer(
            max_epochs=epochs, accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False, limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
        )
        trainer.fit(module, datamodule=EditDataModule(str(zsre_file), tokenizer=tokenizer, batch_size=2, val_fraction=0.0), ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = run(2, tmp_path / "a")
    interrupted, _ = run(1, tmp_path / "b")
    assert not torch.equal(interrupted.net.log_lr, straight.net.log_lr)
    resumed, trainer = run(2, tmp_path / "b", ckpt_path="last")
    assert trainer.global_step == 6  # 3 batches per epoch
    for key, value in straight.net.state_dict().items():
        assert torch.allclose(resumed.net.state_dict()[key], value, atol=1e-6), key


def test_metrics_are_logged_per_step_and_per_epoch(tiny_model, tokenizer, zsre_file, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1))
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=_datamodule(zsre_file, tokenizer))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    steps = [r for r in rows if r.get("train/edit_success_step")]
    assert len(steps) == 2  # 4 training requests in batches of 2
    for name in ("train/locality_epoch", "train/rephrase_success_epoch", "val/edit_success", "val/drawdown", "train/loss_edit_step"):
        assert any(r.get(name) for r in rows), name
    # drawdown is 1 - locality
    epoch = next(r for r in rows if r.get("train/locality_epoch"))
    assert abs(float(epoch["train/drawdown_epoch"]) + float(epoch["train/locality_epoch"]) - 1) < 1e-6


def test_ddp_on_two_cpu_processes(tokenizer, zsre_file, tmp_path):
    """Lightning's strategies work unchanged: two CPU processes train one network (gradients
    averaged), and the exported network is what rank 0 trained."""
    from conftest import build_llama

    module = MENDModule(build_llama(len(tokenizer)), MENDConfig(layers=[-1], rank=8, n_hidden=1), lr=1.0e-3)
    trainer = Trainer(
        strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=EditDataModule(str(zsre_file), tokenizer=tokenizer, batch_size=1, val_fraction=0.0))
    net = get_editor("mend")().network(module.base, tokenizer, MENDConfig(layers=[-1], rank=8, n_hidden=1, checkpoint=str(tmp_path / "editor")))
    assert not torch.allclose(net.log_lr, torch.full_like(net.log_lr, float(torch.tensor(1.0e-2).log()))), "nothing was trained"
