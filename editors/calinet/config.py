"""Settings of CaliNET (Dong et al., 2022, "Calibrating Factual Knowledge in Pretrained Language Models", Findings of EMNLP)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class CaliNETConfig(EditorConfig):
    # Defaults for SmolLM2-135M (30 blocks, hidden 576, MLP 1536): see the module docstring.
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1], metadata={"help": "blocks whose FFN gets calibration slots; negative counts from the top"})
    n_slots: int = field(default=64, metadata={"help": "calibration memory slots per layer"})
    steps: int = field(default=40, metadata={"help": "maximum optimisation steps"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate for the slots' keys and values"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay on the slots"})
    activation: str = field(default="gelu", metadata={"help": "slot activation: relu, gelu, gelu_tanh, silu"})
    rephrases: bool = field(default=True, metadata={"help": "also train on each request's rephrase prompts"})
    init_std: float | None = field(default=None, metadata={"help": "standard deviation of the initial keys (None: 1/sqrt(hidden size))"})
    seed: int = field(default=0, metadata={"help": "seed of the keys' initialisation"})
    stop_loss: float = field(default=1e-2, metadata={"help": "stop early once the mean NLL falls below this"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    def __post_init__(self) -> None:
        from ..core.patch import check_activation  # the activations are torch functions

        check_activation(self.activation)
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if self.n_slots < 1 or self.steps < 1 or self.lr <= 0:
            raise ValueError("n_slots and steps must be >= 1 and lr > 0")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"calinet": ("editor", "CaliNETConfig")}
