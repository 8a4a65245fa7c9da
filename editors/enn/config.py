"""Settings of ENN (Sinitsin, Plokhotnyuk, Pyrkin, Popov and Babenko, 2020, "Editable Neural
Networks", ICLR), as MEND (Mitchell et al., 2022) runs it as a baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from factedit.editors.config import LearnedConfig


@dataclass
class ENNConfig(LearnedConfig):
    """Which weights are meta-trained and edited, and the inner loop that edits them."""

    # The same weights as MEND's and KE's defaults: the MLPs of the last three blocks.
    roles: list[str] = field(
        default_factory=lambda: ["mlp_in", "mlp_gate", "mlp_out"],
        metadata={"help": "module roles whose weights are meta-trained and edited (roles the architecture lacks are skipped)"},
    )
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1], metadata={"help": "edited blocks; negative indices count from the top"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})
    # MEND's ENN config (config/alg/enn.yaml) makes one step.
    n_edit_steps: int = field(default=1, metadata={"help": "plain gradient steps of the inner loop on the edit's NLL"})
    # MEND's code starts its learned step sizes at edit_lr 1e-2.
    edit_lr_init: float = field(
        default=1.0e-2,
        metadata={"help": "initial step size of every edited weight (learned during training); untrained ENN steps with it"},
    )

    # n_edit_steps is listed too: a trained network's weights and step sizes are meta-learned for
    # that number of steps. edit_lr_init is only an initial value (the learned ones are saved).
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("roles", "layers", "targets", "n_edit_steps")

    def __post_init__(self) -> None:
        if not self.roles or not self.layers:
            raise ValueError("roles and layers must each name at least one entry")
        if self.n_edit_steps < 1:
            raise ValueError(f"n_edit_steps must be at least 1, got {self.n_edit_steps}")
        if not self.edit_lr_init > 0:
            raise ValueError(f"edit_lr_init must be positive, got {self.edit_lr_init}")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"enn": ("editor", "ENNConfig")}
