"""ENN (Editable Neural Networks): the inner loop, its outer gradient, training and checkpoints, on
tiny random models."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from helpers import build_gpt2, build_llama
from factedit.editors import get_editor
from factedit.editors.enn import ENNConfig
from factedit.editors.core.learned import CheckpointError, answer_accuracy, answer_logits, answer_nll, edited_params, pair_batch, request_batches, save_network
from factedit.editors.core.targets import get_module, get_parameter_name, is_transposed
from factedit.lit_modules.enn import ENNModule
from helpers.training import facts_datamodule, quiet_trainer  # the same six tiny facts and quiet trainer

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _sgd_by_hand(model, batch, modules, lr: float, steps: int) -> dict[str, torch.Tensor]:
    """``W_steps - W_0`` (each weight's own layout) after plain SGD on the sum of the requests' NLLs."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    weights = {m: get_module(model, m).weight for m in modules}
    start = {m: w.detach().clone() for m, w in weights.items()}
    n = batch["input_ids"].shape[0]
    for _ in range(steps):
        for w in weights.values():
            w.requires_grad_(True)
        logits, targets, rows = answer_logits(model, batch)
        grads = torch.autograd.grad(answer_nll(logits, targets, rows, n).sum(), list(weights.values()))
        with torch.no_grad():
            for w, g in zip(weights.values(), grads):
                w.requires_grad_(False)
                w.sub_(lr * g)
    return {m: weights[m].detach() - start[m] for m in modules}


@pytest.mark.parametrize("steps", [1, 3])
def test_untrained_edit_is_plain_gradient_steps(steps, tiny_model, tokenizer, request_factory):
    requests = [request_factory("a", target_new="Paris"), request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome")]
    config = ENNConfig(layers=[-2, -1], n_edit_steps=steps, edit_lr_init=0.5)
    editor = get_editor("enn")()
    modules = editor.network_modules(tiny_model, config)
    batch = request_batches(tokenizer, requests, "cpu")
    lr = float(torch.tensor(math.log(0.5)).exp())  # the step size as the network stores it (a float32 log)
    expected = _sgd_by_hand(tiny_model, batch, modules, lr, steps)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}

    edit = editor.apply(tiny_model, tokenizer, requests, config)
    assert sorted(edit.param_names) == sorted(get_parameter_name(tiny_model, m) for m in modules)
    for name, want in expected.items():
        got = edit.deltas[get_parameter_name(tiny_model, name)].dense()
        assert want.abs().max() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), name
    assert edit.info["trained"] is False and edit.info["n_edit_steps"] == steps
    assert all(v == 0 for v in edit.info["offset_norm"].values())
    # apply, then revert: the weights come back bit for bit
    edit.revert(tiny_model)
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n]), n


def _outer_loss(net, model, edit_batch, rephrase_batch):
    updates = net.updates(model, edit_batch)[1]
    logits, targets, rows = answer_logits(model, rephrase_batch, edited_params(model, updates))
    return answer_nll(logits, targets, rows, 1).mean()


def test_outer_gradient_reaches_the_weights_and_the_step_sizes(tokenizer, request_factory):
    """The unrolled inner loop (two steps, through ``higher``) carries the outer loss's gradient to
    every offset and every step size; the step sizes' gradient matches finite differences, which
    it would not if the inner steps were taken as constants (first order)."""
    model = build_llama(len(tokenizer)).double()
    model.requires_grad_(False)
    config = ENNConfig(layers=[-2, -1], n_edit_steps=2, edit_lr_init=2.0)
    editor = get_editor("enn")()
    net = editor.build_network(model, tokenizer, config).double()
    with torch.no_grad():  # a meta-trained-looking start: nonzero offsets
        for offset in net.offsets:
            offset.copy_(torch.randn(offset.shape, generator=torch.Generator().manual_seed(offset.numel()), dtype=torch.float64) * 0.01)
    edit = request_batches(tokenizer, [request_factory(target_new="Paris")], "cpu")
    rephrase = request_batches(tokenizer, [request_factory(prompt="Danielle Darrieux speaks", target_new="Paris")], "cpu")

    net.train()
    loss = _outer_loss(net, model, edit, rephrase)
    loss.backward()
    assert all(offset.grad is not None and offset.grad.abs().sum() > 0 for offset in net.offsets)
    assert net.log_lr.grad is not None and (net.log_lr.grad != 0).all()

    eps = 1e-3  # the NLL is computed in float32
    for index in range(len(net.module_names)):
        with torch.no_grad():
            net.log_lr[index] += eps
            up = float(_outer_loss(net, model, edit, rephrase))
            net.log_lr[index] -= 2 * eps
            down = float(_outer_loss(net, model, edit, rephrase))
            net.log_lr[index] += eps
        assert float(net.log_lr.grad[index]) == pytest.approx((up - down) / (2 * eps), rel=1e-2, abs=1e-4), net.module_names[index]

    # Not tracked outside training mode: detached updates, the same values.
    net.eval()
    with torch.no_grad():
        tracked = {k: v.detach() for k, v in net.train().updates(model, edit)[1].items()}
    net.eval()
    loss_before, untracked = net.updates(model, edit)
    assert all(not u.requires_grad for u in untracked.values())
    assert all(torch.allclose(untracked[k], tracked[k], atol=1e-12) for k in tracked)
    assert float(loss_before) > 0


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def test_fast_dev_run(tiny_model, tokenizer, tmp_path):
    module = ENNModule(model=tiny_model, editor=ENNConfig(layers=[-1]), lr=1e-3, lr_lr=1e-1)
    data = facts_datamodule(tmp_path, tokenizer, batch_size=2, val_fraction=0.34)
    trainer = quiet_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/edit_success", "train/rephrase_success", "train/locality", "train/loss_locality", "train/loss_base", "val/score"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # one Adam step moved every offset (by about lr) and the step sizes
    assert all(offset.detach().abs().max() > 1e-4 for offset in module.net.offsets)
    assert not torch.allclose(module.net.log_lr.detach(), torch.full_like(module.net.log_lr, math.log(1e-2)))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("base.") for k in checkpoint["state_dict"]) and "net.log_lr" in checkpoint["state_dict"]
    assert checkpoint["factedit"]["editor"] == "enn"


def test_base_loss_is_zero_untrained_and_grows_with_the_offsets(tokenizer):
    model = build_gpt2(len(tokenizer))
    module = ENNModule(model=model, editor=ENNConfig(layers=[-1]))
    module.configure_model()
    locality = pair_batch(tokenizer, [("The capital of Italy is", "Rome")], "cpu")
    assert float(module.base_loss(locality).detach()) == 0.0
    with torch.no_grad():
        module.net.offsets[0].normal_(std=0.5)
    assert float(module.base_loss(locality).detach()) > 1e-4


def _outer_losses(module, data) -> float:
    """The mean outer loss (edit + locality + base) over the training batches, without training."""
    module.eval()
    losses = []
    for batch in data.train_dataloader():
        with torch.enable_grad():
            losses.append(float(module.step(batch)["loss"]))
    return sum(losses) / len(losses)


def _edit_success(model, tokenizer, config, requests) -> tuple[float, float]:
    """Mean teacher-forced accuracy of each new target on its prompt and on its rephrase, each
    request edited alone (and reverted)."""
    editor, edit_scores, rephrase_scores = get_editor("enn")(), [], []
    for request in requests:
        edit = editor.apply(model, tokenizer, [request], config)
        try:
            with torch.no_grad():
                for prompt, scores in ((request.prompt, edit_scores), (request.rephrase_prompts[0], rephrase_scores)):
                    batch = pair_batch(tokenizer, [(prompt, request.target_new)], "cpu")
                    scores.append(float(answer_accuracy(*answer_logits(model, batch), 1)[0]))
        finally:
            edit.revert(model)
    return sum(edit_scores) / len(edit_scores), sum(rephrase_scores) / len(rephrase_scores)


def test_training_beats_the_untrained_editor_and_the_export_reloads(tokenizer, tmp_path):
    model = build_gpt2(len(tokenizer))
    settings = dict(layers=[-2, -1], n_edit_steps=1, edit_lr_init=0.02)  # too short a step to edit this model
    data = facts_datamodule(tmp_path, tokenizer, batch_size=2, val_fraction=0.0)
    data.setup("fit")
    requests = data.train_requests
    untrained = _edit_success(model, tokenizer, ENNConfig(**settings), requests)

    module = ENNModule(model=model, editor=ENNConfig(**settings), lr=3e-3, lr_lr=1e-1, edit_weight=1.0)
    module.configure_model()
    loss_untrained = _outer_losses(module, data)
    trainer = quiet_trainer(tmp_path, max_steps=40, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert (tmp_path / "editor" / "editor.safetensors").is_file()  # written at the end of fitting
    loss_trained = _outer_losses(module, data)
    # (a tiny random model's predictions are nearly uniform: its NLL cannot fall far below log(vocab))
    assert loss_trained < loss_untrained - 0.2, (loss_untrained, loss_trained)
    assert min(module.net.edit_lrs()) > 0.04  # the step sizes grew

    exported = module.export(tmp_path / "exported")
    loaded = ENNConfig(checkpoint=str(exported), **settings)
    trained = _edit_success(model, tokenizer, loaded, requests)
    assert trained[0] >= untrained[0] + 0.5 and trained[1] >= untrained[1] + 0.5, (untrained, trained)

    # The editor built from the checkpoint makes exactly the trained network's edit: offset + steps.
    editor = get_editor("enn")()
    batch = request_batches(tokenizer, requests[:2], "cpu")
    module.net.eval()
    _, expected = module.net.updates(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edit = editor.apply(model, tokenizer, requests[:2], loaded)
    assert edit.info["trained"] is True and all(v > 0 for v in edit.info["offset_norm"].values())
    for name, update in expected.items():
        got = edit.deltas[get_parameter_name(model, name)].dense()
        want = update.T if is_transposed(get_module(model, name)) else update
        assert torch.equal(got, want), name
    edit.revert(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_wrong_checkpoints_are_refused(tokenizer, tmp_path, request_factory):
    model = build_gpt2(len(tokenizer))
    config = ENNConfig(layers=[-1])
    editor = get_editor("enn")()
    net = editor.build_network(model, tokenizer, config)
    signature = ENNModule(model=model, editor=config).signature()
    save_network(net, tmp_path / "enn", "enn", config, signature)
    request = [request_factory()]
    with pytest.raises(CheckpointError, match="n_edit_steps: checkpoint 1, config 2"):
        editor.apply(model, tokenizer, request, ENNConfig(checkpoint=str(tmp_path / "enn"), layers=[-1], n_edit_steps=2))
    with pytest.raises(CheckpointError, match="layers"):
        editor.apply(model, tokenizer, request, ENNConfig(checkpoint=str(tmp_path / "enn"), layers=[-2]))
    with pytest.raises(CheckpointError, match="model_type"):
        editor.apply(build_llama(len(tokenizer)), tokenizer, request, ENNConfig(checkpoint=str(tmp_path / "enn"), layers=[-1]))
    # edit_lr_init is only an initial value: a checkpoint loads whatever it says
    edit = editor.apply(model, tokenizer, request, ENNConfig(checkpoint=str(tmp_path / "enn"), layers=[-1], edit_lr_init=0.5))
    assert edit.info["edit_lrs"] == pytest.approx([1e-2] * 2)  # c_fc and c_proj


@pytest.mark.parametrize("value", [0, -1])
def test_config_refuses_no_steps(value):
    with pytest.raises(ValueError, match="n_edit_steps"):
        ENNConfig(n_edit_steps=value)


@pytest.mark.parametrize("name", ["zsre", "zsre-quick", "counterfact"])
def test_training_configs_build(name, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    path = Path(__file__).resolve().parents[2] / "configs" / "enn" / f"{name}.yaml"
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    assert isinstance(cli.model, ENNModule)
    assert cli.model.config.architecture() == ENNConfig().architecture()  # --editor.checkpoint alone loads the result
    assert cli.trainer.checkpoint_callback.save_last or any(getattr(c, "save_last", False) for c in cli.trainer.checkpoint_callbacks)
