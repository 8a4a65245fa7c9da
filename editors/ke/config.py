"""Settings of KE (KnowledgeEditor; De Cao, Aziz and Titov, 2021, "Editing Factual Knowledge in
Language Models", EMNLP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import LearnedConfig


@dataclass
class KEConfig(LearnedConfig):
    """The hyper-network's shape and the scale of the update it predicts (all in ``ARCHITECTURE``)."""

    roles: list[str] = field(
        default_factory=lambda: ["mlp_in", "mlp_gate", "mlp_out"],
        metadata={"help": "module roles whose weights are edited (roles the architecture lacks, e.g. mlp_gate in GPT-2, are skipped)"},
    )
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1], metadata={"help": "blocks whose modules are edited; negative indices count from the top"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})
    lstm_hidden: int = field(default=128, metadata={"help": "hidden size of each direction of the condition encoder's bidirectional LSTM"})
    condition_dim: int = field(default=256, metadata={"help": "size of the condition vector c"})
    head_hidden: int = field(default=128, metadata={"help": "hidden size of each edited weight's FFNN head (alpha, beta, gamma, delta, eta)"})
    standardise: bool = field(
        default=True,
        metadata={"help": "read the gradient's factors centred and whitened by statistics of training edits (false: the paper's raw gradient)"},
    )
    # On standardised factors, the step MEND's measurements found best for the untrained network
    # (see MENDConfig.edit_lr_init); for the raw gradient the paper's code uses 1e-3 to 1e-1.
    step_size: float = field(
        default=8.0e-4,
        metadata={"help": "scale s of the update s*sigma(eta)*(...); the untrained network makes the gradient step W - s*grad"},
    )

    # step_size is listed too: a trained network's outputs are calibrated to the scale it was trained with.
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("roles", "layers", "lstm_hidden", "condition_dim", "head_hidden", "standardise", "step_size")

    def __post_init__(self) -> None:
        if not self.roles or not self.layers:
            raise ValueError("roles and layers must each name at least one entry")
        if min(self.lstm_hidden, self.condition_dim, self.head_hidden) < 1:
            raise ValueError("lstm_hidden, condition_dim and head_hidden must be positive")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"ke": ("editor", "KEConfig")}
