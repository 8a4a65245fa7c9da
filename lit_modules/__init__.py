"""LightningModules that train hypernetwork editors (the training loop only; the editors live in
``editors/``). Run them with ``python train.py fit --config configs/<method>/<dataset>.yaml``."""
