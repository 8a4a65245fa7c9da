"""KE (KnowledgeEditor): the update equation, its initialisation, training and checkpoints, on tiny
random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import build_gpt2, build_llama
from helpers.training import facts_datamodule, quiet_trainer
from factedit.editors import get_editor
from factedit.editors.ke import KEConfig, predict_updates
from factedit.editors.core.learned import CheckpointError, answer_accuracy, answer_logits, answer_nll, gradient_pieces, request_batches, save_network
from factedit.editors.core.targets import get_module, get_parameter_name, is_transposed
from factedit.lit_modules.ke import KEModule

SMALL = dict(lstm_hidden=16, condition_dim=32, head_hidden=32)


def _perturb_heads(net, std: float = 0.3) -> None:
    """Make every coefficient depend on the condition (the initial output layers are constant)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in net.heads.values():
            head.out.weight.add_(torch.randn(head.out.weight.shape, generator=generator) * std)
            head.out.bias.add_(torch.randn(head.out.bias.shape, generator=generator) * std)


def _true_gradients(model, batch, modules) -> dict[str, torch.Tensor]:
    """Dense ``dL/dW`` in ``[out, in]`` layout by plain autograd (the reference for the pieces)."""
    weights = [get_module(model, m).weight for m in modules]
    for w in weights:
        w.requires_grad_(True)
    logits, targets, rows = answer_logits(model, batch)
    loss = answer_nll(logits, targets, rows, batch["input_ids"].shape[0]).mean()
    grads = torch.autograd.grad(loss, weights)
    for w in weights:
        w.requires_grad_(False)
    return {m: g.T if is_transposed(get_module(model, m)) else g for m, g in zip(modules, grads)}


def _edit_loss(model, tokenizer, requests) -> float:
    batch = request_batches(tokenizer, requests, "cpu")
    with torch.no_grad():
        logits, targets, rows = answer_logits(model, batch)
        return float(answer_nll(logits, targets, rows, len(requests)).mean())


def test_update_is_low_rank_and_matches_the_dense_formula(tiny_model, tokenizer, request_factory):
    tiny_model.requires_grad_(False)
    requests = [
        request_factory("a", target_new="Paris"),
        request_factory("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome in Africa", target_true="Rome"),
    ]
    editor = get_editor("ke")()
    config = KEConfig(step_size=0.5, **SMALL)
    net = editor.network(tiny_model, tokenizer, config)
    _perturb_heads(net)
    batch = request_batches(tokenizer, requests, "cpu")
    with torch.no_grad():
        _, updates = predict_updates(net, tiny_model, batch)
        embeds = tiny_model.get_input_embeddings()(batch["input_ids"])
        conditions = net.encoder(embeds, batch["attention_mask"])
    n_tokens = int(batch["attention_mask"].sum())

    # The paper's update equation, densely, each request with the gradient of its own loss.
    per_request = [_true_gradients(tiny_model, request_batches(tokenizer, [r], "cpu"), net.module_names) for r in requests]
    sig, references = torch.sigmoid, {}
    for name, update in updates.items():
        assert update.left.shape[1] == update.right.shape[0] == n_tokens + len(requests)  # rank: tokens + 1 per request
        reference = 0
        for b, grads in enumerate(per_request):
            alpha, beta, gamma, delta, eta = (t[b] for t in net.heads[name.replace(".", "__")].coefficients(conditions))
            reference = reference + config.step_size * sig(eta) * (torch.outer(sig(alpha), gamma) * grads[name] + torch.outer(sig(beta), delta))
        assert torch.allclose(update.dense(), reference, rtol=1e-4, atol=1e-6 * reference.abs().max()), name
        assert torch.allclose(update.norm(), reference.norm(), rtol=1e-4)
        references[name] = reference

    # A condition does not depend on the other requests in the batch.
    alone = request_batches(tokenizer, requests[1:], "cpu")
    with torch.no_grad():
        single = net.encoder(tiny_model.get_input_embeddings()(alone["input_ids"]), alone["attention_mask"])
    assert torch.allclose(single[0], conditions[1], atol=1e-6)

    # The edit (same editor, so the same perturbed network) stores these factors in each weight's
    # own layout (GPT-2's Conv1D is [in, out]).
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    edit = editor.apply(tiny_model, tokenizer, requests, config)
    assert edit.info["rank"] == {name: n_tokens + len(requests) for name in net.module_names}
    for name, reference in references.items():
        param = get_parameter_name(tiny_model, name)
        delta = edit.deltas[param]
        assert delta.delta is None and delta.rank == n_tokens + len(requests)
        reference = reference.T if is_transposed(get_module(tiny_model, name)) else reference
        assert torch.allclose(delta.dense(), reference, rtol=1e-4, atol=1e-6 * reference.abs().max()), name
        assert torch.allclose(dict(tiny_model.named_parameters())[param], before[param] + delta.dense(), atol=1e-6)


def test_untrained_network_makes_a_gradient_descent_step(tiny_model, tokenizer, request_factory):
    tiny_model.requires_grad_(False)
    request = request_factory(target_new="Paris")
    config = KEConfig(step_size=0.1)  # no statistics yet: the standardisation is the identity
    grads = _true_gradients(tiny_model, request_batches(tokenizer, [request], "cpu"), get_editor("ke")().network_modules(tiny_model, config))
    loss_before = _edit_loss(tiny_model, tokenizer, [request])
    edit = get_editor("ke")().apply(tiny_model, tokenizer, [request], config)
    for name, grad in grads.items():
        module = get_module(tiny_model, name)
        dense = edit.deltas[get_parameter_name(tiny_model, name)].dense()
        step = -config.step_size * (grad.T if is_transposed(module) else grad)  # W - s * grad
        assert torch.allclose(dense, step, rtol=1e-4, atol=1e-6 * step.abs().max()), name
    assert edit.info["loss_before"] == pytest.approx(loss_before, rel=1e-5)
    assert _edit_loss(tiny_model, tokenizer, [request]) < loss_before - 1e-3


def test_untrained_network_makes_the_standardised_step_once_statistics_are_warmed(tiny_model, tokenizer, request_factory, tmp_path):
    """With statistics, the untrained update is -s * sum_i d~_i u~_i^T over the tokens that carry a
    gradient (centred and whitened by each module's statistics), and an exported network carries
    its statistics to edit.py."""
    tiny_model.requires_grad_(False)
    config = KEConfig(step_size=0.05, **SMALL)
    editor = get_editor("ke")()
    net = editor.network(tiny_model, tokenizer, config)
    facts = [("The capital of Italy is", "Italy", "Rome"), ("Angola is located in", "Angola", "Africa"), ("Michel Rocard speaks", "Michel Rocard", "French")]
    warm = [request_factory(str(i), prompt=p, subject=subject, target_new=t) for i, (p, subject, t) in enumerate(facts)]
    _, pieces = gradient_pieces(tiny_model, request_batches(tokenizer, warm, "cpu"), net.module_names)
    net.observe(pieces)
    assert net.observed() > 0
    net.eval()

    request = request_factory(target_new="Paris")
    batch = request_batches(tokenizer, [request], "cpu")
    _, pieces = gradient_pieces(tiny_model, batch, net.module_names)
    with torch.no_grad():
        _, updates = predict_updates(net, tiny_model, batch)
    for index, name in enumerate(net.module_names):
        piece = pieces[name]
        keep = (piece.inputs != 0).any(-1) & (piece.grads != 0).any(-1)
        assert 0 < int(keep.sum()) < len(keep)  # the last token has no gradient
        u_mean, u_std = net.u_stats[index].moments(torch.float32)
        g_mean, g_std = net.grad_stats[index].moments(torch.float32)
        u, g = (piece.inputs[keep] - u_mean) / u_std, (piece.grads[keep] - g_mean) / g_std
        reference = -config.step_size * g.T @ u
        assert torch.allclose(updates[name].dense(), reference, rtol=1e-4, atol=1e-6 * reference.abs().max()), name
        raw = -config.step_size * piece.grads.T @ piece.inputs
        assert not torch.allclose(reference, raw, rtol=1e-2)  # the statistics made a difference

    signature = KEModule(model=tiny_model, editor=config).signature()
    save_network(net, tmp_path / "ke", "ke", config, signature)
    edit = editor.apply(tiny_model, tokenizer, [request], KEConfig(checkpoint=str(tmp_path / "ke"), step_size=0.05, **SMALL))
    edit.revert(tiny_model)
    for name in net.module_names:
        got = edit.deltas[get_parameter_name(tiny_model, name)].dense()
        got = got.T if is_transposed(get_module(tiny_model, name)) else got
        assert torch.allclose(got, updates[name].dense(), rtol=1e-4, atol=1e-7), name


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_fast_dev_run(tiny_model, tokenizer, tmp_path):
    module = KEModule(model=tiny_model, editor=KEConfig(**SMALL), lr=1e-3, margin=1e-4, multiplier_init=1.0)
    data = facts_datamodule(tmp_path, tokenizer, batch_size=2, val_fraction=0.34)
    trainer = quiet_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/edit_success", "train/rephrase_success", "train/locality", "train/loss_locality", "train/multiplier", "val/edit_success"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert any(h.out.weight.detach().abs().sum() > 0 for h in module.net.heads.values()), "no optimiser step reached the network"
    # One training step, one Adam ascent step on lambda: +multiplier_lr if KL > margin, else -multiplier_lr.
    kl = float(metrics["train/loss_locality"])
    direction = 1.0 if kl > 1e-4 else -1.0
    assert kl > 0 and float(module.multiplier.detach()) == pytest.approx(1.0 + direction * module.multiplier_lr, rel=1e-4)
    assert module.net.observed() > 0  # the statistics were warmed up before the step
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # the frozen model stays out; network and multiplier go in
    assert "multiplier" in checkpoint["state_dict"] and any(k.startswith("net.") for k in checkpoint["state_dict"])
    assert not any(k.startswith("base.") for k in checkpoint["state_dict"])
    assert checkpoint["factedit"]["editor"] == "ke"


def test_dual_ascent_on_the_multiplier_and_margin_annealing(tokenizer):
    module = KEModule(model=build_gpt2(len(tokenizer)), editor=KEConfig(**SMALL), margin=0.1, margin_min=0.05, multiplier_init=0.5, multiplier_lr=0.2)
    module.configure_model()
    module.train()
    optimiser = module.configure_optimizers()

    def step(kl: float) -> float:
        optimiser.zero_grad()
        loss = module.combine(torch.tensor(1.0), torch.tensor(kl))
        loss.backward()
        optimiser.step()
        module.on_train_batch_end(None, None, 0)
        return float(loss)

    assert step(0.3) == pytest.approx(1.0 + 0.5 * (0.3 - 0.1))  # the Lagrangian at the current multiplier
    assert float(module.multiplier) == pytest.approx(0.5 + 0.2, rel=1e-4)  # violated: an ascent step of about lr
    for _ in range(3):
        step(0.3)
    grown = float(module.multiplier)
    assert grown > 0.7
    for _ in range(15):
        step(0.0)  # satisfied: lambda falls (once Adam's momentum has turned)
    assert float(module.multiplier.detach()) < grown
    for _ in range(40):
        step(0.0)
    assert float(module.multiplier.detach()) == 0.0  # and stays non-negative

    # The margin tightens (x0.8, not below margin_min) only after validations whose edits succeed.
    def validate(success: float) -> float:
        module.val_edit_success.update(torch.full((4,), success))
        module.on_validation_epoch_end()
        return float(module.margin)

    module._trainer = type("T", (), {"sanity_checking": False})()
    assert validate(0.5) == pytest.approx(0.1)
    assert validate(0.95) == pytest.approx(0.08)
    assert validate(0.95) == pytest.approx(0.064)
    assert validate(1.0) == pytest.approx(0.0512)
    assert validate(1.0) == pytest.approx(0.05)  # margin_min
    assert validate(1.0) == pytest.approx(0.05)


def _edit_success(model, tokenizer, config, requests) -> float:
    """Mean teacher-forced token accuracy of each new target after editing it alone."""
    editor, scores = get_editor("ke")(), []
    for request in requests:
        batch = request_batches(tokenizer, [request], "cpu")
        edit = editor.apply(model, tokenizer, [request], config)
        try:
            with torch.no_grad():
                scores.append(float(answer_accuracy(*answer_logits(model, batch), 1)[0]))
        finally:
            edit.revert(model)
    return sum(scores) / len(scores)


def test_training_beats_the_untrained_network_and_the_export_reloads(tokenizer, tmp_path):
    model = build_gpt2(len(tokenizer))
    config = KEConfig(step_size=0.03, **SMALL)
    data = facts_datamodule(tmp_path, tokenizer, batch_size=1, val_fraction=0.0)
    data.setup("fit")
    requests = data.train_requests
    untrained = _edit_success(model, tokenizer, config, requests)

    module = KEModule(model=model, editor=config, lr=1e-2, margin=1.0, multiplier_init=0.1)
    trainer = quiet_trainer(tmp_path, max_steps=60, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert (tmp_path / "editor" / "editor.safetensors").is_file()  # written at the end of fitting
    exported = module.export(tmp_path / "exported")

    loaded = KEConfig(checkpoint=str(exported), step_size=0.03, **SMALL)
    trained = _edit_success(model, tokenizer, loaded, requests)
    assert trained >= 0.8 and trained >= untrained + 0.5, (untrained, trained)

    # The editor built from the checkpoint computes exactly the trained network's update.
    editor = get_editor("ke")()
    batch = request_batches(tokenizer, requests[:2], "cpu")
    module.net.eval()
    with torch.no_grad():
        _, expected = predict_updates(module.net, model, batch)
    edit = editor.apply(model, tokenizer, requests[:2], loaded)
    edit.revert(model)
    for name, update in expected.items():
        got = edit.deltas[get_parameter_name(model, name)].dense()
        want = update.dense().T if is_transposed(get_module(model, name)) else update.dense()
        assert torch.equal(got, want), name
    assert edit.info["trained"] is True


def test_wrong_checkpoints_are_refused(tokenizer, tmp_path, request_factory):
    model = build_gpt2(len(tokenizer))
    config = KEConfig(**SMALL)
    editor = get_editor("ke")()
    net = editor.build_network(model, tokenizer, config)
    signature = KEModule(model=model, editor=config).signature()
    save_network(net, tmp_path / "ke", "ke", config, signature)
    save_network(net, tmp_path / "mend", "mend", config, signature)
    request = [request_factory()]

    with pytest.raises(CheckpointError, match="trained for 'mend', not 'ke'"):
        editor.apply(model, tokenizer, request, KEConfig(checkpoint=str(tmp_path / "mend"), **SMALL))
    with pytest.raises(CheckpointError, match="head_hidden: checkpoint 32, config 64"):
        editor.apply(model, tokenizer, request, KEConfig(checkpoint=str(tmp_path / "ke"), **{**SMALL, "head_hidden": 64}))
    with pytest.raises(CheckpointError, match="step_size"):
        editor.apply(model, tokenizer, request, KEConfig(checkpoint=str(tmp_path / "ke"), step_size=1.0, **SMALL))
    with pytest.raises(CheckpointError, match="model_type"):
        editor.apply(build_llama(len(tokenizer)), tokenizer, request, KEConfig(checkpoint=str(tmp_path / "ke"), **SMALL))
    edit = editor.apply(model, tokenizer, request, KEConfig(checkpoint=str(tmp_path / "ke"), **SMALL))  # the right one loads
    assert edit.is_applied


@pytest.mark.parametrize("name", ["zsre", "zsre-quick", "counterfact"])
def test_training_configs_build(name, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    path = Path(__file__).resolve().parents[2] / "configs" / "ke" / f"{name}.yaml"
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=["--config", str(path)])
    assert isinstance(cli.model, KEModule) and cli.model.config == KEConfig(step_size=cli.model.config.step_size)
    assert cli.model.config.architecture() == KEConfig().architecture()  # --editor.checkpoint alone loads the result
    assert any(callback.save_last for callback in cli.trainer.checkpoint_callbacks)  # --ckpt_path last resumes
