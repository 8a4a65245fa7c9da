"""SERAC: routing, exact revert, shared memory, generation, saving, and training (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import build_gpt2, build_llama, make_request
from helpers.training import SERAC_TINY as TINY
from helpers.training import quiet_trainer, train_serac
from factedit.datamodules.edit_datamodule import EditDataModule
from factedit.editors import Edit, EditError, get_editor
from factedit.editors.base import QA
from factedit.editors.core.learned import CheckpointError, answer_accuracy, answer_logits, label_positions, save_network
from factedit.editors.core.lm import collate_pairs, encode_pair, hidden_states, logits_at
from factedit.editors.serac import SERAC, SERACConfig, SERACEdit, EditMemory, base_pass, route
from factedit.lit_modules.serac import SERACModule

BUILD = {"gpt2": build_gpt2, "llama": build_llama}

# (subject, question, rephrase, new answer): questions share templates, so the classifier must
# tell them apart by subject; answers are words the tiny tokenizer knows.
FACTS = [
    ("Danielle Darrieux", "What is the mother tongue of Danielle Darrieux?", "Which language does Danielle Darrieux speak?", "Italy"),
    ("Toko Yasuda", "What does Toko Yasuda play?", "Which instrument is played by Toko Yasuda?", "Paris"),
    ("Michel Rocard", "What is the mother tongue of Michel Rocard?", "Which language does Michel Rocard speak?", "Africa"),
    ("Angola", "Where is Angola located?", "On which continent is Angola?", "Rome"),
    ("Eiffel Tower", "In which city is the Eiffel Tower?", "Where is the Eiffel Tower located?", "guitar"),
    ("Antarctica", "What is Antarctica?", "Antarctica is what kind of place?", "French"),
    ("the company", "When was the company founded?", "In which year was the company founded?", "English"),
    ("France", "What is the capital of France?", "Which city is the capital of France?", "continent"),
]
LOCALITY = ["nq question: who plays the guitar", "nq question: what is the capital of Italy", "nq question: who speaks French", "nq question: where is Rome"]


def fact_records() -> list[dict]:
    return [
        {"subject": s, "src": q, "rephrase": r, "alt": a, "answers": ["old"], "loc": LOCALITY[i % len(LOCALITY)], "loc_ans": "Mike"}
        for i, (s, q, r, a) in enumerate(FACTS)
    ]


def fact_requests() -> list:
    return [make_request(str(i), prompt=q, subject=s, target_new=a, rephrase_prompts=(r,), locality=(QA(LOCALITY[i % len(LOCALITY)], "Mike"),)) for i, (s, q, r, a) in enumerate(FACTS)]


def first_logits(model, tokenizer, pairs) -> torch.Tensor:
    """Logits at the position predicting each pair's first target token ``[n, vocab]``."""
    batch = collate_pairs([encode_pair(tokenizer, p, t) for p, t in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = logits_at(model, batch)
    first = torch.tensor([0] + list(torch.tensor(batch.lengths).cumsum(0)[:-1]))
    return logits[first]


def apply(model, tokenizer, requests, **settings):
    return SERAC().apply(model, tokenizer, requests, SERACConfig(**{**TINY, **settings}))


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(fact_records()))
    return path


# --------------------------------------------------------------------------------------------
# Routing and the memory (untrained network: exact-match routing)
# --------------------------------------------------------------------------------------------


def test_untrained_routing_is_exact_match_and_out_of_scope_rows_are_untouched(tiny_model, tokenizer):
    req = make_request(target_new="Paris")
    pairs = [(req.prompt, "Paris"), ("The capital of Italy is", "Rome"), (req.rephrase_prompts[0], "Paris")]
    batch = collate_pairs([encode_pair(tokenizer, p, t) for p, t in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        before = logits_at(tiny_model, batch)
        full_before = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    edit = apply(tiny_model, tokenizer, [req])
    assert edit.param_names == [] and isinstance(edit, SERACEdit)
    memory = EditMemory.of(tiny_model)
    with torch.no_grad():
        after = logits_at(tiny_model, batch)
        full_after = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        features, _ = base_pass(tiny_model, memory.network, batch.input_ids, batch.attention_mask)
        routing, probability = route(memory.network, memory.bank, features, batch.attention_mask)
    # the position predicting the answer routes on the prompt alone; nothing else matches exactly
    assert routing[0, batch.cols[0]] == 0 and probability[0, batch.cols[0]] > 0.5
    assert (routing[1:] == -1).all()
    rows = batch.rows
    assert not torch.equal(before[rows == 0], after[rows == 0])
    assert torch.equal(before[rows != 0], after[rows != 0]), "out-of-scope rows must be bit-identical"
    # model(...) sees the routed states too
    assert torch.allclose(full_after[batch.rows, batch.cols], after, atol=1e-5)
    assert torch.equal(full_after[1:], full_before[1:])
    edit.revert(tiny_model)
    with torch.no_grad():
        assert torch.equal(logits_at(tiny_model, batch), before)
    assert EditMemory.of(tiny_model) is None and not tiny_model.base_model._forward_hooks


def test_routed_position_reads_the_counterfactual_model(tiny_model, tokenizer):
    req = make_request(target_new="Paris")
    edit = apply(tiny_model, tokenizer, [req])
    network = EditMemory.of(tiny_model).network
    prompt, target = encode_pair(tokenizer, req.prompt, "Paris")
    sequence = torch.tensor([prompt + target + tokenizer("\n", add_special_tokens=False)["input_ids"] + prompt])
    with torch.no_grad(), EditMemory.of(tiny_model).bypassed():
        expected = tiny_model.get_output_embeddings()(network.counterfactual_hidden(tiny_model, sequence, torch.ones_like(sequence))[0, -1])
    assert torch.allclose(first_logits(tiny_model, tokenizer, [(req.prompt, "Paris")])[0], expected, atol=1e-5)
    edit.revert(tiny_model)


def test_two_edits_share_one_memory_and_revert_separately(tiny_model, tokenizer):
    a = make_request("a", target_new="Paris")
    b = make_request("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome")
    pairs = [(a.prompt, "Paris"), (b.prompt, "Rome")]
    base = first_logits(tiny_model, tokenizer, pairs)
    only = apply(tiny_model, tokenizer, [b])
    only_b = first_logits(tiny_model, tokenizer, pairs)
    only.revert(tiny_model)
    edit_a, edit_b = apply(tiny_model, tokenizer, [a]), apply(tiny_model, tokenizer, [b])
    memory = EditMemory.of(tiny_model)
    assert len(memory.entries) == 2 and len(memory._handles) == 2
    edit_a.revert(tiny_model)
    assert EditMemory.of(tiny_model) is memory and len(memory.entries) == 1
    now = first_logits(tiny_model, tokenizer, pairs)
    assert torch.equal(now[0], base[0]) and torch.allclose(now[1], only_b[1], atol=1e-5)
    assert not torch.equal(now[1], base[1])
    with pytest.raises(EditError, match="other settings"):
        apply(tiny_model, tokenizer, [a], seed=1)
    edit_b.revert(tiny_model)
    assert EditMemory.of(tiny_model) is None
    assert torch.equal(first_logits(tiny_model, tokenizer, pairs), base)


def test_one_call_with_several_requests(tiny_model, tokenizer):
    requests = [make_request("a", target_new="Paris"), make_request("b", prompt="The capital of Italy is", subject="Italy", target_new="Rome")]
    edit = apply(tiny_model, tokenizer, requests)
    assert edit.case_ids == ["a", "b"] and len(EditMemory.of(tiny_model).entries) == 2
    edit.revert(tiny_model)
    assert EditMemory.of(tiny_model) is None


def test_save_load_applies_to_a_fresh_model(tiny_model, tokenizer, tmp_path):
    arch = "gpt2" if tiny_model.config.model_type == "gpt2" else "llama"
    req = make_request(target_new="Paris")
    pairs = [(req.prompt, "Paris"), ("The capital of Italy is", "Rome")]
    edit = apply(tiny_model, tokenizer, [req])
    edited = first_logits(tiny_model, tokenizer, pairs)
    edit.save(tmp_path / "edit")
    edit.revert(tiny_model)
    loaded = Edit.load(tmp_path / "edit")
    assert isinstance(loaded, SERACEdit) and loaded.case_ids == ["0"] and loaded.param_names == []
    fresh = BUILD[arch](len(tokenizer))
    with loaded.applied(fresh):
        assert torch.equal(first_logits(fresh, tokenizer, pairs), edited)
    assert EditMemory.of(fresh) is None


def left_padded(tokenizer, prompts):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


def greedy_without_cache(model, tokenizer, prompt: str, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by full forward passes (no cache, no padding): tokens and their logits."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits.append(model(input_ids=ids, use_cache=False).logits[0, -1])
        ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], 1)
    return ids[0, -steps:].tolist(), torch.stack(logits)


def test_generation_with_cache_routes_every_step(tiny_model, tokenizer):
    """Hand-set classifier that routes every position (threshold -1): each generated token comes
    from the counterfactual model re-reading the row's whole history, without its padding."""
    req = make_request(target_new="Paris")
    prompts = [req.prompt, "The capital of Italy is"]
    inputs = left_padded(tokenizer, prompts)
    width = inputs["input_ids"].shape[1]
    greedy = dict(do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=True)
    base = torch.stack(tiny_model.generate(**inputs, **greedy).logits, 1)
    edit = apply(tiny_model, tokenizer, [req], init_threshold=-1.0)
    try:
        out = tiny_model.generate(**inputs, **greedy)
        logits = torch.stack(out.logits, 1)  # [batch, step, vocab]
        for row, prompt in enumerate(prompts):
            tokens, expected = greedy_without_cache(tiny_model, tokenizer, prompt, 4)
            assert out.sequences[row, width:].tolist() == tokens
            assert torch.allclose(logits[row], expected, atol=1e-4)
        assert not torch.allclose(logits, base, atol=1e-2)
        # beam search reorders the cache between steps; the history must follow it
        out = tiny_model.generate(
            **inputs, do_sample=False, num_beams=3, num_return_sequences=3, max_new_tokens=4, min_new_tokens=4,
            length_penalty=0.0, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True,
        )
        for i, sequence in enumerate(out.sequences):
            ids = sequence[inputs["attention_mask"][i // 3].bool().tolist() + [True] * 4][None]
            with torch.no_grad():
                logp = tiny_model(input_ids=ids, use_cache=False).logits[0, -5:-1].log_softmax(-1)
            assert torch.allclose(logp.gather(1, ids[0, -4:, None]).sum(), out.sequences_scores[i], atol=1e-3), i
    finally:
        edit.revert(tiny_model)
    assert not hasattr(tiny_model, "_reorder_cache")


def test_counterfactual_model_is_the_frozen_model_with_a_copy_of_its_top_blocks(tiny_model, tokenizer, tmp_path):
    """The copy holds only the top ``cf_layers`` blocks and the final norm; the lower blocks and
    embeddings stay the model's own; untrained, it computes exactly the frozen model."""
    network = SERAC().network(tiny_model, tokenizer, SERACConfig(**TINY))
    blocks = tiny_model.base_model.layers if hasattr(tiny_model.base_model, "layers") else tiny_model.base_model.h
    top = network.top.layers if hasattr(network.top, "layers") else network.top.h
    assert len(top) == TINY["cf_layers"] and network.entry_module.endswith(f".{len(blocks) - TINY['cf_layers'] - 1}")
    for copied, original in zip(top, blocks[-TINY["cf_layers"] :]):
        for (name, a), (_, b) in zip(copied.named_parameters(), original.named_parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert not {p.data_ptr() for p in network.parameters()} & {p.data_ptr() for p in tiny_model.parameters()}
    # saved state: the classifier and the copy, no embedding (token or position) and no lower block
    hidden = tiny_model.config.hidden_size if hasattr(tiny_model.config, "hidden_size") else tiny_model.config.n_embd
    state = network.state_dict()
    assert all(k.split(".")[0] in ("proj", "log_scale", "threshold", "top") for k in state)
    assert not any(len(tokenizer) in v.shape or tiny_model.config.max_position_embeddings in v.shape for v in state.values())
    copy_size = sum(p.numel() for p in top.parameters()) + sum(v.numel() for k, v in state.items() if k.startswith("top.") and ".layers." not in k and ".h." not in k)
    assert sum(v.numel() for k, v in state.items() if k.startswith("top.")) == copy_size and copy_size < sum(p.numel() for p in blocks.parameters())
    assert hidden == network.proj.in_features
    # untrained: the whole frozen model (positions, final norm and all)
    ids = collate_pairs([encode_pair(tokenizer, "The capital of Italy is", "Rome")], tokenizer.pad_token_id).input_ids
    with torch.no_grad():
        assert torch.allclose(network.counterfactual_hidden(tiny_model, ids, torch.ones_like(ids)), hidden_states(tiny_model, ids, torch.ones_like(ids)), atol=1e-5)
    with pytest.raises(ValueError, match="cf_layers must be between 1 and 2"):
        SERAC().network(tiny_model, tokenizer, SERACConfig(**{**TINY, "cf_layers": 3}))


@pytest.mark.parametrize("sequential", [False, True], ids=["one-call", "sequential"])
def test_many_edits_route_each_input_to_its_nearest_edit(tiny_model, tokenizer, sequential):
    """Eight edits in memory at once: each edit prompt is answered as with its own edit alone,
    an unrelated prompt is untouched."""
    requests = fact_requests()
    probes = [(r.prompt, r.target_new) for r in requests] + [(LOCALITY[0], "Mike")]
    base = first_logits(tiny_model, tokenizer, probes)
    alone = []
    for i, req in enumerate(requests):
        edit = apply(tiny_model, tokenizer, [req])
        alone.append(first_logits(tiny_model, tokenizer, probes[i : i + 1])[0])
        edit.revert(tiny_model)
    edits = [apply(tiny_model, tokenizer, [r]) for r in requests] if sequential else [apply(tiny_model, tokenizer, requests)]
    memory = EditMemory.of(tiny_model)
    assert len(memory.entries) == len(requests)
    batch = collate_pairs([encode_pair(tokenizer, p, t) for p, t in probes], tokenizer.pad_token_id)
    with torch.no_grad():
        features, _ = base_pass(tiny_model, memory.network, batch.input_ids, batch.attention_mask)
        routing, _ = route(memory.network, memory.bank, features, batch.attention_mask)
    first = torch.tensor([0] + list(torch.tensor(batch.lengths).cumsum(0)[:-1]))
    rows, cols = batch.rows[first], batch.cols[first]
    assert routing[rows, cols].tolist() == list(range(len(requests))) + [-1]
    together = first_logits(tiny_model, tokenizer, probes)
    for i in range(len(requests)):
        assert torch.allclose(together[i], alone[i], atol=1e-5), i
    assert torch.equal(together[-1], base[-1])
    for edit in reversed(edits):
        edit.revert(tiny_model)
    assert EditMemory.of(tiny_model) is None


def test_prefix_mean_features_agree_with_and_without_a_cache(tiny_model, tokenizer):
    """The pooled feature of a position is the same whether its prefix comes in one pass or in
    pieces (the carry of a KV-cached pass), with padding on the left."""
    network = SERAC().network(tiny_model, tokenizer, SERACConfig(**TINY))
    states = torch.randn(2, 7, network.proj.in_features)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    whole, _ = network.pool(states, mask)
    head, carry = network.pool(states[:, :4], mask[:, :4])
    tail, _ = network.pool(states[:, 4:], mask[:, 4:], carry)
    assert torch.allclose(torch.cat([head, tail], 1), whole, atol=1e-6)
    unit = torch.nn.functional.normalize(states[0, 2:5], dim=-1).mean(0)
    assert torch.allclose(whole[0, 4], unit, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_fast_dev_run(tiny_model, tokenizer, data_file, tmp_path):
    module = SERACModule(model=tiny_model, editor=SERACConfig(**TINY))
    data = EditDataModule(str(data_file), tokenizer=tokenizer, batch_size=4, val_fraction=0.25)
    quiet_trainer(tmp_path, fast_dev_run=True).fit(module, data)
    metrics = quiet_trainer(tmp_path, fast_dev_run=True).validate(module, data, verbose=False)[0]
    assert {"val/loss", "val/edit_success", "val/rephrase_success", "val/locality"} <= set(metrics)


def test_training_batch_holds_hard_negatives(tokenizer, data_file):
    """The classifier's pairs in a batch: each prompt and rephrase is in scope of its own edit
    only; the other edits' questions (here two share the relation "mother tongue of") and the
    locality prompts are negatives of every edit."""
    model = build_llama(len(tokenizer))
    module = SERACModule(model=model, editor=SERACConfig(**TINY))
    module.configure_model()
    data = EditDataModule(str(data_file), tokenizer=tokenizer, batch_size=8, val_fraction=0.0, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    net, n = module.net, len(batch["case_id"])
    with torch.no_grad():
        passes = {p: base_pass(model, net, batch[p]["input_ids"], batch[p]["attention_mask"]) for p in ("edit", "rephrase", "locality")}
        positions = {p: label_positions(batch[p]["labels"]) for p in passes}
        key_rows, key_cols, _ = positions["edit"]
        keys = net.embed(passes["edit"][0][key_rows, key_cols])
        logits, labels, parts = module.scope_pairs(passes, positions, keys, key_rows, n)
    assert logits.shape == labels.shape == (len(parts), n)
    for part in ("edit", "rephrase"):
        rows = positions[part][0]
        own = labels[[i for i, p in enumerate(parts) if p == part]]
        assert torch.equal(own, torch.nn.functional.one_hot(rows, n).float())  # others' questions: negatives
    assert labels[[i for i, p in enumerate(parts) if p == "locality"]].sum() == 0
    subjects = [json.loads(data_file.read_text())[int(c)]["subject"] for c in batch["case_id"]]
    a, b = subjects.index("Danielle Darrieux"), subjects.index("Michel Rocard")  # same relation
    rephrase_rows = torch.tensor([i for i, p in enumerate(parts) if p == "rephrase"])
    of_b = rephrase_rows[positions["rephrase"][0] == b]
    assert (labels[of_b, a] == 0).all() and (labels[of_b, b] == 1).all()


@pytest.mark.parametrize("bound", [0.0, 0.25, 0.5])
def test_calibration_raises_the_threshold_to_the_false_positive_bound(tokenizer, data_file, bound):
    """With a threshold that routes everything, calibration on held-out batches leaves at most
    ``bound`` of the locality positions routed, exactly at the cosine the bound allows, and
    keeps the edit prompts (which match their own key) routed."""
    model = build_llama(len(tokenizer))
    module = SERACModule(model=model, editor=SERACConfig(**TINY, init_threshold=-1.0), scope_false_positive=bound)
    module.configure_model()
    data = EditDataModule(str(data_file), tokenizer=tokenizer, batch_size=4, val_fraction=0.5, seed=0)
    data.setup("fit")
    with torch.no_grad():
        cosines = [module.scope_cosines(batch) for batch in data.val_dataloader()]
    negatives = torch.cat([c["locality"] for c in cosines]).sort(descending=True).values
    assert float(negatives[-1]) > -1.0  # everything is routed before calibration
    report = module.calibrate_threshold(data.val_dataloader())
    threshold = module.net.threshold.item()
    assert threshold == pytest.approx(float(negatives[int(bound * len(negatives))]))
    assert float((negatives > threshold).float().mean()) <= bound
    assert report["learned_threshold"] == -1.0 and report["routed_before"]["locality"] == 1.0
    assert report["routed_after"]["locality"] <= bound and report["positions"]["locality"] == len(negatives)
    own = torch.cat([c["edit"] for c in cosines])
    assert torch.allclose(own, torch.ones_like(own), atol=1e-5)  # an edit prompt is its own key


def test_calibration_never_lowers_a_strict_threshold(tokenizer, data_file):
    model = build_llama(len(tokenizer))
    module = SERACModule(model=model, editor=SERACConfig(**TINY, init_threshold=0.9999), scope_false_positive=0.5)
    module.configure_model()
    data = EditDataModule(str(data_file), tokenizer=tokenizer, batch_size=4, val_fraction=0.5, seed=0)
    data.setup("fit")
    report = module.calibrate_threshold(data.val_dataloader())
    assert float(module.net.threshold) == pytest.approx(0.9999) and report["threshold"] == report["learned_threshold"]
    off = SERACModule(model=model, editor=SERACConfig(**TINY), scope_false_positive=None)
    off.configure_model()
    assert off.calibrate_threshold(data.val_dataloader()) is None
    with pytest.raises(ValueError, match="scope_false_positive"):
        SERACModule(model=model, editor=SERACConfig(**TINY), scope_false_positive=1.0)


def test_fit_exports_the_calibrated_threshold(tokenizer, data_file, tmp_path):
    """The exported network carries the calibrated threshold and the report in its metadata."""
    model = build_llama(len(tokenizer))
    module = SERACModule(model=model, editor=SERACConfig(**TINY, init_threshold=-1.0), scope_false_positive=0.0)
    data = EditDataModule(str(data_file), tokenizer=tokenizer, batch_size=4, val_fraction=0.5, seed=0)
    quiet_trainer(tmp_path, max_steps=1, num_sanity_val_steps=0).fit(module, data)
    meta = json.loads((tmp_path / "editor" / "editor.json").read_text())
    assert meta["scope_calibration"]["threshold"] > -1.0
    assert meta["scope_calibration"]["routed_after"]["locality"] == 0.0
    fresh = build_llama(len(tokenizer))
    edit = SERAC().apply(fresh, tokenizer, fact_requests()[:1], SERACConfig(**TINY, checkpoint=str(tmp_path / "editor")))
    assert float(EditMemory.of(fresh).network.threshold) == pytest.approx(meta["scope_calibration"]["threshold"])
    edit.revert(fresh)


def scores(model, tokenizer, requests, settings) -> dict[str, float]:
    """Per-request editing: first-token accuracy on the prompt and rephrase, locality agreement."""
    hits = {"edit": 0, "rephrase": 0, "locality": 0}
    for req in requests:
        probes = [(req.prompt, req.target_new), (req.rephrase_prompts[0], req.target_new), (req.locality[0].prompt, req.locality[0].answer)]
        base = first_logits(model, tokenizer, probes)
        edit = SERAC().apply(model, tokenizer, [req], SERACConfig(**settings))
        after = first_logits(model, tokenizer, probes)
        edit.revert(model)
        target = encode_pair(tokenizer, req.prompt, req.target_new)[1][0]
        hits["edit"] += int(after[0].argmax() == target)
        hits["rephrase"] += int(after[1].argmax() == target)
        hits["locality"] += int(torch.equal(after[2], base[2]))
    return {k: v / len(requests) for k, v in hits.items()}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, tmp_path_factory, tokenizer):
    """A SERAC network trained for a few seconds on FACTS, and its exported checkpoint."""
    model = BUILD[request.param](len(tokenizer))
    module, checkpoint = train_serac(model, tokenizer, fact_requests(), tmp_path_factory.mktemp(f"serac-{request.param}"))
    return request.param, module, checkpoint


def test_training_scores_are_the_editors(trained, tokenizer, tmp_path):
    """The routed scores logged in training come from the same routing as an applied edit."""
    arch, module, checkpoint = trained
    (tmp_path / "facts.json").write_text(json.dumps(fact_records()))
    data = EditDataModule(str(tmp_path / "facts.json"), tokenizer=tokenizer, batch_size=4, val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.eval()
    with torch.no_grad():
        out = module.step(batch)
    requests = {r.case_id: r for r in fact_requests()}
    model = module.base
    edit = SERAC().apply(model, tokenizer, [requests[c] for c in batch["case_id"]], SERACConfig(**TINY, checkpoint=str(checkpoint)))
    try:
        for part in ("edit", "rephrase"):
            with torch.no_grad():
                logits, targets, rows = answer_logits(model, batch[part])
            assert torch.allclose(answer_accuracy(logits, targets, rows, 4), out[f"{part}_success"])
    finally:
        edit.revert(model)
    assert out["loss"].isfinite() and out["loss_classifier"] >= 0 and out["loss_counterfactual"] >= 0


def test_training_beats_the_untrained_network(trained, tokenizer):
    arch, module, checkpoint = trained
    model = BUILD[arch](len(tokenizer))
    requests = fact_requests()
    untrained = scores(model, tokenizer, requests, TINY)
    after = scores(model, tokenizer, requests, {**TINY, "checkpoint": str(checkpoint)})
    assert untrained["edit"] <= 0.25 and untrained["rephrase"] <= 0.25
    assert after["edit"] >= 0.75 and after["rephrase"] >= 0.6, after
    assert after["locality"] >= 0.75, after


def test_checkpoint_reproduces_the_trained_network(trained, tokenizer, tmp_path):
    arch, module, checkpoint = trained
    exported = module.export(tmp_path / "exported")
    model = BUILD[arch](len(tokenizer))
    req = fact_requests()[0]
    pairs = [(req.prompt, req.target_new), (req.rephrase_prompts[0], req.target_new)]
    outputs = []
    for path in (checkpoint, exported):
        edit = SERAC().apply(model, tokenizer, [req], SERACConfig(**TINY, checkpoint=str(path)))
        outputs.append(first_logits(model, tokenizer, pairs))
        edit.revert(model)
    trained_net = module.net.eval()
    text = torch.tensor(sum(encode_pair(tokenizer, req.prompt, req.target_new), []))
    n_target = len(encode_pair(tokenizer, req.prompt, req.target_new)[1])
    separator = torch.tensor(tokenizer("\n", add_special_tokens=False)["input_ids"])
    direct = SERACEdit("serac", [text], [n_target], separator, config={"direct": True}, network=(id(model), trained_net))
    with direct.applied(model):
        outputs.append(first_logits(model, tokenizer, pairs))
    assert torch.equal(outputs[0], outputs[1]) and torch.allclose(outputs[0], outputs[2], atol=1e-5)


def test_trained_generation_edits_in_scope_prompts_only(trained, tokenizer):
    arch, _, checkpoint = trained
    model = BUILD[arch](len(tokenizer))
    req = fact_requests()[1]
    prompts = [req.prompt, "nq question: who speaks French"]
    inputs = left_padded(tokenizer, prompts)
    generate = lambda: model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1] :]
    base = generate()
    edit = SERAC().apply(model, tokenizer, [req], SERACConfig(**TINY, checkpoint=str(checkpoint)))
    try:
        generated = generate()
        for row, prompt in enumerate(prompts):
            assert generated[row].tolist() == greedy_without_cache(model, tokenizer, prompt, generated.shape[1])[0]
    finally:
        edit.revert(model)
    assert generated[0, 0] == encode_pair(tokenizer, req.prompt, req.target_new)[1][0] != base[0, 0]
    assert torch.equal(generated[1], base[1])


def test_wrong_editor_checkpoint_is_refused(trained, tokenizer, tmp_path):
    arch, module, checkpoint = trained
    config = SERACConfig(**TINY)
    save_network(module.net, tmp_path / "mend", "mend", config, module.signature())
    model = BUILD[arch](len(tokenizer))
    with pytest.raises(CheckpointError, match="trained for 'mend', not 'serac'"):
        SERAC().apply(model, tokenizer, [make_request()], SERACConfig(**TINY, checkpoint=str(tmp_path / "mend")))
    with pytest.raises(CheckpointError, match="cf_layers"):
        SERAC().apply(model, tokenizer, [make_request()], SERACConfig(**{**TINY, "cf_layers": 1}, checkpoint=str(checkpoint)))
    assert EditMemory.of(model) is None


def test_registered():
    assert get_editor("serac") is SERAC and SERAC.config_class is SERACConfig


def test_saved_edit_refuses_another_architecture_even_when_forced(tokenizer, tmp_path):
    gpt2, llama = build_gpt2(len(tokenizer)), build_llama(len(tokenizer))
    edit = apply(gpt2, tokenizer, [make_request(target_new="Paris")])
    assert edit.info["architecture"] == {"model_type": "gpt2", "hidden_size": 32, "vocab_size": len(tokenizer)}
    edit.save(tmp_path / "edit")
    edit.revert(gpt2)
    with pytest.raises(EditError, match="architecture 'llama'"):
        Edit.load(tmp_path / "edit").apply(llama)
    with pytest.raises(EditError, match="SERAC edit was made for another architecture: this model has model_type 'llama'"):
        Edit.load(tmp_path / "edit").apply(llama, force=True)
    assert EditMemory.of(llama) is None
