"""Settings of MEND."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from factedit.editors.config import LearnedConfig


@dataclass
class MENDConfig(LearnedConfig):
    # MEND edits the MLP weights of the last three blocks (Mitchell et al., 2022, section 5).
    roles: list[str] = field(default_factory=lambda: ["mlp_in", "mlp_gate", "mlp_out"], metadata={"help": "module roles edited in each layer (roles the architecture lacks are skipped)"})
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1], metadata={"help": "edited blocks; negative indices count from the top"})
    rank: int = field(default=256, metadata={"help": "hidden width of each residual layer of the gradient transform (MEND uses 1920 for large models)"})
    n_hidden: int = field(default=2, metadata={"help": "residual layers in the gradient transform"})
    # On standardised factors; measured on 25 held-out zsRE training edits with SmolLM2-135M and
    # warmed statistics: 4e-4 0.86/0.79/0.96, 8e-4 0.95/0.94/0.95, 1.6e-3 0.96/0.96/0.87
    # (reliability / generalization / locality of the untrained network).
    edit_lr_init: float = field(default=8.0e-4, metadata={"help": "initial per-module edit step size alpha on standardised factors (learned during training)"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("roles", "layers", "rank", "n_hidden", "targets")

    def __post_init__(self) -> None:
        if not self.roles or not self.layers:
            raise ValueError("roles and layers must each name at least one entry")
        if self.rank < 1 or self.n_hidden < 1:
            raise ValueError("rank and n_hidden must be at least 1")
        if self.edit_lr_init <= 0:
            raise ValueError("edit_lr_init must be positive")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"mend": ("editor", "MENDConfig")}
