"""Train a learned editor with Lightning: ``python train.py fit --config configs/<method>/<data>.yaml``.

The model (a LightningModule from ``lit_modules``) and the data (a LightningDataModule from
``datamodules``) are both chosen in the YAML by ``class_path``/``init_args``.
"""

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
