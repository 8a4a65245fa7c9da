"""Train a learned editor with Lightning: ``python train.py fit --config configs/<method>/<data>.yaml``.

The model (a LightningModule from ``lit_modules``) and the data (a LightningDataModule from
``datamodules``) are both chosen in the YAML by ``class_path``/``init_args``. The resolved config is
written beside the logs (nowhere without a logger, unless ``trainer.default_root_dir`` is set); an
unreadable checkpoint names the others to pass with ``--ckpt_path`` (see :mod:`lit_modules.cli`).
"""

from lit_modules.cli import EditorCLI


def main() -> None:
    EditorCLI(subclass_mode_model=True, subclass_mode_data=True)


if __name__ == "__main__":
    main()
