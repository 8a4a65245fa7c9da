"""Settings of the fine-tuning editors FT-L and FT-M."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class FTConfig(EditorConfig):
    # Layer 3 of SmolLM2-135M's 30: the best CounterFact score S of layers 2-20 on the demo set
    # (scripts/sweep_ft_layers.sh); later layers generalise the edit to the whole relation.
    layers: list[int] = field(default_factory=lambda: [3], metadata={"help": "indices of the blocks whose module is fine-tuned"})
    module: str = field(default="mlp_out", metadata={"help": "role in the architecture table to tune: mlp_out, mlp_in, attn_out, ..."})
    objective: str = field(
        default="target_tokens",
        metadata={"help": "'target_tokens': teacher-forced loss on the target tokens (FT-M); 'prompt_last': all target tokens scored at the last prompt position (FT-L)"},
    )
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    steps: int = field(default=25, metadata={"help": "maximum optimisation steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    norm_constraint: float | None = field(default=None, metadata={"help": "L-infinity bound on the change of each weight (None: unconstrained)"})
    stop_loss: float = field(default=1e-3, metadata={"help": "stop early once the mean loss falls below this"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    def __post_init__(self) -> None:
        if self.objective not in ("target_tokens", "prompt_last"):
            raise ValueError(f"objective must be 'target_tokens' or 'prompt_last', got {self.objective!r}")
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 1 and lr > 0")
        # A bound below zero makes the clamp's lower limit exceed its upper one (torch.clamp then
        # returns the upper limit, a change of |bound| in every weight); zero allows no change.
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint is an L-infinity bound on each weight's change and must be positive (or None for no bound), got {self.norm_constraint}")


@dataclass
class FTLConfig(FTConfig):
    objective: str = "prompt_last"
    # ROME bounded GPT-2 XL's weights by 5e-4; on SmolLM2-135M that bound leaves the edit at
    # ES 0.07 on the demo set, 5e-3 reaches ES 0.93 (scripts/sweep_ft_layers.sh).
    norm_constraint: float | None = 5e-3


@dataclass
class FTMConfig(FTConfig):
    objective: str = "target_tokens"


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"ft_l": ("editor", "FTLConfig"), "ft_m": ("editor", "FTMConfig")}
