"""MEND and the machinery learned editors share (gradient pieces, functional edits, checkpoints,
the training loop), on tiny random GPT-2 and LLaMA models."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

from factedit.datamodules.edit_datamodule import EditDataModule
from factedit.editors import get_editor
from factedit.editors.core.learned import (
    CheckpointError,
    answer_logits,
    answer_nll,
    edited_modules,
    edited_params,
    gradient_pieces,
    pair_batch,
    read_checkpoint,
)
from factedit.editors.mend import MENDConfig
from factedit.editors.mend.network import nonzero_pieces
from factedit.editors.core.targets import is_transposed, weight_as_out_in
from factedit.lit_modules.base import single_request
from factedit.lit_modules.mend import MENDModule

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


def _standardised(stats, x: torch.Tensor) -> torch.Tensor:
    mean, std = stats.moments(torch.float32)
    return (x - mean) / std


def test_transform_outputs_the_standardised_factors_at_initialisation(tiny_model, tokenizer, request_factory):
    """At initialisation g is the identity on standardised factors: the edit is the standardised
    step -alpha sum_i delta~_i u~_i^T (MEND's code), with each module's own statistics."""
    config = MENDConfig(roles=["mlp_in", "mlp_out"], layers=[-2, -1], rank=8, n_hidden=2, edit_lr_init=0.5)
    editor = get_editor("mend")()
    net = editor.network(tiny_model, tokenizer, config)
    modules = net.module_names
    _, warm = gradient_pieces(tiny_model, pair_batch(tokenizer, PAIRS, "cpu"), modules)
    net.observe(warm)
    assert net.observed() > 0

    request = request_factory(target_new="Paris")
    _, pieces = gradient_pieces(tiny_model, pair_batch(tokenizer, [(request.prompt, request.target_new)], "cpu"), modules)
    factors = net.factors(pieces)
    edit = editor.apply(tiny_model, tokenizer, [request], config)
    edit.revert(tiny_model)
    for index, name in enumerate(modules):
        u, delta = nonzero_pieces(pieces[name])
        assert 0 < u.shape[0] < pieces[name].inputs.shape[0]  # the last token has no gradient and is skipped
        u_std, delta_std = _standardised(net.u_stats[index], u), _standardised(net.delta_stats[index], delta)
        left, right = factors[name]
        assert torch.allclose(right, u_std, atol=1e-5)  # the transform's output is its input
        assert torch.allclose(left, -0.5 * delta_std.T, atol=1e-5)
        got = edit.deltas[f"{name}.weight"].dense()
        if is_transposed(tiny_model.get_submodule(name)):
            got = got.T
        assert torch.allclose(got, -0.5 * delta_std.T @ u_std, atol=1e-5, rtol=1e-4), name
        assert edit.deltas[f"{name}.weight"].rank == u.shape[0]  # stored as factors


def test_statistics_are_kept_per_module(tiny_model, tokenizer):
    """Modules of one shape share a transform but not their statistics."""
    config = MENDConfig(roles=["mlp_in"], layers=[-2, -1], rank=8, n_hidden=1)
    net = get_editor("mend")().build_network(tiny_model, tokenizer, config)
    first, second = net.module_names
    assert net.shape_of[first] == net.shape_of[second] and len(net.transforms) == 1
    _, pieces = gradient_pieces(tiny_model, pair_batch(tokenizer, PAIRS, "cpu"), net.module_names)
    net.observe(pieces)
    for index, name in enumerate(net.module_names):
        u, delta = nonzero_pieces(pieces[name])
        assert int(net.u_stats[index].count) == u.shape[0]
        assert torch.allclose(net.u_stats[index].mean.float(), u.mean(0), atol=1e-5)
        assert torch.allclose(net.delta_stats[index].moments(torch.float32)[1], delta.std(0), rtol=1e-3, atol=1e-12)
    assert not torch.allclose(net.u_stats[0].mean, net.u_stats[1].mean)


def test_untrained_network_without_statistics_is_a_gradient_step(tiny_model, tokenizer, request_factory):
    """Before any statistics the standardisation is the identity: -alpha * dL/dW."""
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


def _datamodule(path, tokenizer, **kwargs):
    return EditDataModule(str(path), tokenizer=tokenizer, batch_size=2, val_fraction=0.34, **kwargs)


def test_fast_dev_run(tiny_model, tokenizer, zsre_file, tmp_path):
    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1))
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(zsre_file, tokenizer))
    assert trainer.state.finished
    assert "train/loss" in trainer.callback_metrics and "val/edit_success" in trainer.callback_metrics


@pytest.mark.parametrize("edits_per_step, sizes", [("single", [1, 1]), ("batch", [2])])
def test_one_edit_per_inner_update(tiny_model, tokenizer, zsre_file, tmp_path, edits_per_step, sizes):
    """With single edits every request of a batch gets its own update from the unedited weights
    (the edit.py protocol); with batch edits the batch makes one update."""
    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1), edits_per_step=edits_per_step, warmup_edits=2)
    seen: list[int] = []
    updates = module.updates
    module.updates = lambda batch: seen.append(len(batch["case_id"])) or updates(batch)
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(zsre_file, tokenizer))
    assert seen == sizes + sizes  # one training and one validation batch of two requests
    assert int(module.net.observed()) > 0  # the statistics were warmed up before the first step


def test_single_edit_scores_equal_editing_each_request_alone(tiny_model, tokenizer, zsre_file):
    """A batch's single-edit scores are those of each request edited alone (padding removed)."""
    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1, edit_lr_init=3.0))
    module.configure_model()
    module.eval()
    data = _datamodule(zsre_file, tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    together = module.step(batch)
    alone = [module.edit_losses(single_request(batch, row)) for row in range(2)]
    for name in ("edit_success", "rephrase_success", "locality"):
        assert torch.allclose(together[name], torch.cat([a[name] for a in alone]), atol=1e-6), name
    assert torch.allclose(together["loss_edit"], (alone[0]["loss_edit"] + alone[1]["loss_edit"]) / 2, atol=1e-5)
    assert together["edit_success"].shape == (2,)


@pytest.mark.parametrize("parts", [["edit"], ["rephrase"], ["edit", "rephrase"]])
def test_edit_parts_choose_the_edit_loss(tiny_model, tokenizer, zsre_file, parts):
    """The edit loss is the mean NLL after the edit of the parts named (the rephrase by default)."""
    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1, edit_lr_init=3.0), edit_parts=parts)
    module.configure_model()
    module.eval()
    data = _datamodule(zsre_file, tokenizer)
    data.setup("fit")
    out = module.edit_losses(single_request(next(iter(data.train_dataloader())), 0))
    assert sorted(k for k in out if k.startswith("loss_edit_")) == sorted(f"loss_edit_{p}" for p in parts)
    assert torch.allclose(out["loss_edit"], torch.stack([out[f"loss_edit_{p}"] for p in parts]).mean())
    assert out["loss_edit"].requires_grad  # differentiable in the network
    with pytest.raises(ValueError, match="edit_parts"):
        MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1), edit_parts=["locality"])


def test_contrast_loss_is_the_narrowed_margin_of_the_locality_answer(tiny_model, tokenizer, zsre_file):
    """``contrast_weight``: the loss adds how much the edit narrowed, on the locality prompt, the
    lead of its answer over the edit's new target (mean token NLLs), computed here by hand."""
    module = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1, edit_lr_init=3.0), contrast_weight=0.5)
    module.configure_model()
    module.eval()
    data = _datamodule(zsre_file, tokenizer)
    data.setup("fit")
    batch = single_request(next(iter(data.train_dataloader())), 0)
    out = module.edit_losses(batch)
    params = edited_params(module.base, module.updates(batch))

    def margin(edited):
        nll = {part: answer_nll(*answer_logits(module.base, batch[part], edited), 1) for part in ("contrast", "locality")}
        return nll["contrast"] - nll["locality"]

    expected = torch.relu(margin({}) - margin(params)).mean()
    assert torch.allclose(out["loss_contrast"], expected, atol=1e-6)
    # An edit that made the locality answer 5 nats less likely narrows the margin by that much more.
    answer = answer_nll(*answer_logits(module.base, batch["locality"]), 1)
    new = {name: answer_nll(*answer_logits(module.base, batch["contrast"], edited), 1) for name, edited in (("before", {}), ("after", params))}
    narrowed = module.contrast_loss(batch["contrast"], params, answer, answer + 5.0)
    assert narrowed > 0 and narrowed.requires_grad
    assert torch.allclose(narrowed, torch.relu(new["before"] - new["after"] + 5.0).mean(), atol=1e-5)
    combined = module.step(batch)
    assert torch.allclose(combined["loss"], module.combine(combined["loss_edit"], combined["loss_locality"]) + 0.5 * combined["loss_contrast"], atol=1e-6)
    module.contrast_weight = 0.0  # the default: MEND's own loss
    assert "loss_contrast" not in module.edit_losses(batch) and "loss_contrast" not in module.step(batch)
    with pytest.raises(ValueError, match="contrast_weight"):
        MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1), contrast_weight=-1.0)


def test_warm_up_only_exports_the_untrained_warmed_network(tiny_model, tokenizer, zsre_file, tmp_path):
    """``max_steps=0``: the statistics of the first ``warmup_edits`` training edits, no step."""
    config = MENDConfig(layers=[-1], rank=8, n_hidden=1)
    module = MENDModule(tiny_model, config, warmup_edits=3, export_dir=str(tmp_path / "warmed"))
    trainer = Trainer(max_steps=0, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    data = _datamodule(zsre_file, tokenizer)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0

    net = get_editor("mend")().network(tiny_model, tokenizer, MENDConfig(layers=[-1], rank=8, n_hidden=1, checkpoint=str(tmp_path / "warmed")))
    expected = get_editor("mend")().build_network(tiny_model, tokenizer, config)
    first = [single_request(batch, row) for batch in data.train_dataloader() for row in range(len(batch["case_id"]))][:3]
    for request in first:
        expected.observe(gradient_pieces(tiny_model, request["edit"], expected.module_names)[1])
    stats = [key for key in expected.state_dict() if "_stats." in key]
    assert stats and net.observed() > 0
    for key in stats:  # the same statistics
        assert torch.allclose(net.state_dict()[key], expected.state_dict()[key]), key
    for name, value in net.named_parameters():  # and the untrained network
        assert torch.equal(value, module.net.state_dict()[name]), name
    assert net.edit_lrs() == pytest.approx([config.edit_lr_init] * len(net.module_names))
    assert all(float(layer.up.weight.abs().sum()) == 0 for layer in net.transforms[0].layers)


def test_the_best_validation_network_is_exported(tiny_model, tokenizer, zsre_file, tmp_path):
    """With a ModelCheckpoint monitoring a validation metric, ``editor/`` holds the best
    checkpoint's network, not the last step's, and ``max_time`` stops the run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class FirstIsBest(MENDModule):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log("val/first", float(self.global_step))  # lowest at the first validation

    module = FirstIsBest(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1), lr=1.0e-2, lr_lr=0.3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/first", mode="min")
    resumable = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=0, save_last=True)
    trainer = Trainer(
        max_steps=6, val_check_interval=1, check_val_every_n_epoch=None, accelerator="cpu", logger=False, callbacks=[resumable, checkpoint],
        enable_progress_bar=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=_datamodule(zsre_file, tokenizer))
    best, _, _ = read_checkpoint(checkpoint.best_model_path)
    last, _, _ = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    exported, _, _ = read_checkpoint(tmp_path / "editor")
    assert "step=1" in checkpoint.best_model_path and torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert any(not torch.equal(best[key], last[key]) for key in best)
    for key, value in best.items():
        assert torch.equal(exported[key], value), key
        assert torch.equal(module.net.state_dict()[key], value), key

    timed = MENDModule(tiny_model, MENDConfig(layers=[-1], rank=8, n_hidden=1), export_dir=str(tmp_path / "timed"))
    trainer = Trainer(max_time={"seconds": 1}, max_steps=100_000, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(timed, datamodule=_datamodule(zsre_file, tokenizer))
    assert 0 < trainer.global_step < 100_000 and (tmp_path / "timed" / "editor.safetensors").is_file()


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
    from helpers import build_llama
    from factedit.datamodules.records import load_requests

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
    from helpers import build_llama
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
    from helpers import build_llama

    module = MENDModule(build_llama(len(tokenizer)), MENDConfig(layers=[-1], rank=8, n_hidden=1), lr=1.0e-3)
    trainer = Trainer(
        strategy="ddp_spawn", devices=2, accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=EditDataModule(str(zsre_file), tokenizer=tokenizer, batch_size=1, val_fraction=0.0))
    net = get_editor("mend")().network(module.base, tokenizer, MENDConfig(layers=[-1], rank=8, n_hidden=1, checkpoint=str(tmp_path / "editor")))
    assert not torch.allclose(net.log_lr, torch.full_like(net.log_lr, float(torch.tensor(MENDConfig().edit_lr_init).log()))), "nothing was trained"
