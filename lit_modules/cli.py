"""The ``train.py`` command line: Lightning's CLI over the project's LightningModules and DataModules.

The model is any :class:`~lit_modules.base.EditorModule` and the data any
:class:`~datamodules.edit_datamodule.EditDataModule`, each given by its full class path (as the
YAML files under ``configs/`` do) or by its class name: ``--model MENDModule --data
CounterFactDataModule``; ``--model.help MENDModule`` lists a module's arguments.

Two changes to where files go and come from:

* The resolved config is written into the logger's folder, as Lightning does, but not into the
  working directory when there is no logger (``trainer.logger: false``): Lightning then falls
  back to ``trainer.default_root_dir``, which is the working directory unless it is set, and a
  stray ``config.yaml`` lands wherever the command was started. With no logger it is written
  only where ``trainer.default_root_dir`` says.
* A checkpoint that cannot be read (``--ckpt_path last`` after a run was killed while writing
  ``last.ckpt``) stops with its path and the other checkpoints of its folder to resume from,
  instead of the bare error of ``torch.load``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from factedit.datamodules.edit_datamodule import EditDataModule
from factedit.editors.core.learned import CheckpointError, unreadable_checkpoint

from .base import EditorModule

logger = logging.getLogger(__name__)


class SaveConfigBesideLogs(SaveConfigCallback):
    """Lightning's config writer, minus its fallback to the working directory without a logger."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        trainer_config = self.config.get("trainer") or {}
        if not trainer.loggers and not trainer_config.get("default_root_dir"):
            if trainer.is_global_zero and not self.already_saved:
                logger.info("no logger and no trainer.default_root_dir: the resolved config is not written")
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


class NamedCheckpointIO(TorchCheckpointIO):
    """Loads checkpoints as Lightning does; an unreadable one is a :class:`CheckpointError` that
    names the file and the checkpoints beside it (``--ckpt_path`` takes any of them)."""

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch.load's errors for truncated files vary: OSError, RuntimeError, EOFError...
            raise CheckpointError(unreadable_checkpoint(path, err, "--ckpt_path")) from err


class EditorCLI(LightningCLI):
    """``LightningCLI`` choosing among the subclasses of :class:`EditorModule` and
    :class:`EditDataModule` (every one of the project's is imported with its package, so a class
    name is enough), writing its config with :class:`SaveConfigBesideLogs` and reading checkpoints
    with :class:`NamedCheckpointIO` (unless the config names another plugin)."""

    def __init__(
        self,
        model_class: type[LightningModule] | None = EditorModule,
        datamodule_class: type[LightningDataModule] | None = EditDataModule,
        *args: Any,
        subclass_mode_model: bool = True,
        subclass_mode_data: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("save_config_callback", SaveConfigBesideLogs)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class, datamodule_class, *args, subclass_mode_model=subclass_mode_model, subclass_mode_data=subclass_mode_data, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--threads", type=str, default="auto",
            help="CPU threads of PyTorch: a number, or auto (the cores other processes leave free; OMP_NUM_THREADS set in the environment wins)",
        )

    def before_instantiate_classes(self) -> None:
        from factedit.threads import set_threads

        config = self.config[self.config.subcommand] if getattr(self.config, "subcommand", None) else self.config
        set_threads(config.get("threads", "auto"))

    def _parse_ckpt_path(self) -> None:
        # Lightning reads an explicit --ckpt_path file here (for its hyperparameters), before the
        # trainer exists; "last" is resolved and read later, by the checkpoint IO.
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # argument errors are SystemExit and pass through
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise CheckpointError(unreadable_checkpoint(path, err, "--ckpt_path")) from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
            trainer.strategy.checkpoint_io = NamedCheckpointIO()
        return trainer


def main() -> None:
    """``python train.py`` and the ``factedit-train`` console script."""
    EditorCLI()
