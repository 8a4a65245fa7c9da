"""Train a learned editor with Lightning: ``python train.py fit --config configs/<method>/<data>.yaml``.

The model (a LightningModule from ``lit_modules``) and the data (a LightningDataModule from
``datamodules``) are both chosen in the YAML by ``class_path``/``init_args``, or on the command
line by class name (``--model MENDModule --data CounterFactDataModule``; ``--model.help
MENDModule`` lists a module's arguments). The resolved config is written beside the logs (nowhere
without a logger, unless ``trainer.default_root_dir`` is set); an unreadable checkpoint names the
others to pass with ``--ckpt_path`` (see :mod:`factedit.lit_modules.cli`). The same command is installed as
``factedit-train``.
"""

from factedit.lit_modules.cli import main


if __name__ == "__main__":
    main()
