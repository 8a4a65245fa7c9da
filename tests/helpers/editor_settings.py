"""Settings that let every editor edit a tiny random model in the shared checks."""

from __future__ import annotations


TEST_SETTINGS: dict[str, dict] = {
    "ft_m": dict(layers=[1], lr=1e-2, steps=40),
    "ft_l": dict(layers=[1], lr=2e-2, steps=40, norm_constraint=0.2),
    "kn": dict(lambda_new=100.0, max_neurons=10),  # a tiny random model's activations are small: a large lambda_2
    "serac": dict(classifier_layer=1, embedding_dim=16, cf_layers=2),  # with a network trained on the requests edited in the shared checks (TRAINERS there)
    "mend": dict(layers=[-2, -1], rank=8, n_hidden=1, edit_lr_init=3.0),  # untrained MEND is one gradient step of size edit_lr_init
    "enn": dict(layers=[-2, -1], n_edit_steps=2, edit_lr_init=3.0),  # untrained ENN is n_edit_steps gradient steps of size edit_lr_init
    "ke": dict(step_size=3.0),  # untrained KE is one gradient step of size step_size; tiny random models have tiny gradients
    # Locate-then-edit: a tiny random model has small MLP outputs, so the norm penalty and clamp
    # (relative to them) are lifted; key statistics come from 8 short texts sampled from the model.
    "rome": dict(layer=1, v_steps=40, v_weight_decay=0.0, clamp_norm_factor=1e4, context_count=2, stats_samples=8, stats_max_length=16),
    "memit": dict(layers=[0, 1], v_steps=40, v_weight_decay=0.0, clamp_norm_factor=1e4, context_count=2, mom2_update_weight=1e-3, stats_samples=8, stats_max_length=16),
    "pmet": dict(layers=[0, 1], v_steps=40, v_weight_decay=0.0, clamp_norm_factor=1e4, context_count=2, mom2_update_weight=1e-3, stats_samples=8, stats_max_length=16),
    "alphaedit": dict(layers=[0, 1], v_steps=40, v_weight_decay=0.0, clamp_norm_factor=1e4, context_count=2, nullspace_threshold=1e6, l2=1e-3, stats_samples=8, stats_max_length=16),
    # Patch and memory editors: no weight changes; checked on outputs.
    "grace": dict(layer=1),
    "ike": dict(k=0, builtin_pool=False),  # GPT-2's 128 positions: the copy demonstration, the fact line and the probe only
    "t_patcher": dict(),  # defaults: one neuron in the last block's MLP
    "calinet": dict(),  # defaults: 64 slots in each of the top 3 MLPs
    # A tiny random model's FFN activations are small: routing margins scaled down with them.
    "wise": dict(layer=1, alpha=1.0, beta=2.0, gamma=0.0, lr=100.0, steps=100, norm_constraint=None),
}
