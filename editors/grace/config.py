"""Settings of GRACE (Hartvigsen et al., 2023, "Aging with GRACE", NeurIPS)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class GRACEConfig(EditorConfig):
    # SmolLM2-135M has 30 blocks. The paper wraps a late-middle layer of GPT-style models (block 35
    # of GPT2-XL's 48, about 3/4 of the depth): deep enough that the last prompt token's state
    # encodes the whole prompt, early enough that later blocks can still turn the value into the
    # target's tokens. 3/4 of 30 is block 22.
    layer: int = field(default=22, metadata={"help": "block whose MLP is wrapped by the codebook; negative counts from the top"})
    # The paper's eps_init = 1.0 is in the units of its models' activations. SmolLM2-135M's MLP
    # input at block 22 is small (norm about 4.5 at a prompt's last token) and neighbourhood
    # prompts of the same relation end within 0.45-1.3 of an edit's key (paraphrases 1.4-4.3 on
    # CounterFact's demo set), so 1.0 answered neighbours from the codebook; 0.1 keeps to
    # near-exact matches of the edit prompt, the paper's regime.
    eps_init: float = field(
        default=0.1,
        metadata={"help": "initial deferral radius (Euclidean, in the units of the wrapped MLP's input); small: near-exact matches only"},
    )
    steps: int = field(default=100, metadata={"help": "most optimisation steps to train the new values"})
    # The paper's edit_lr. With 0.1 a value at the prompt's last token did not fit multi-token
    # targets in 100 steps (mean target NLL 1.1 to 3.6 nats left on the first zsRE records, so
    # later answer tokens were wrong); 1.0 reaches stop_loss in 7 to 64 steps, in half the time.
    lr: float = field(default=1.0, metadata={"help": "Adam learning rate of the values (the paper's 1.0)"})
    stop_loss: float = field(default=1.0e-2, metadata={"help": "stop training once the mean target NLL falls below this (early stopping)"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    def __post_init__(self) -> None:
        if self.eps_init <= 0:
            raise ValueError(f"eps_init must be positive, got {self.eps_init}")
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("steps must be >= 0 and lr positive")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"grace": ("editor", "GRACEConfig")}
