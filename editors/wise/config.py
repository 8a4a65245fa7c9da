"""Settings of WISE (Wang et al., 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models", NeurIPS)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class WISEConfig(EditorConfig):
    # SmolLM2-135M has 30 blocks. The paper puts the side memory in a late block's value matrix
    # (LLaMA-2-7B: block 27 of 32, about 0.85 of the depth); 0.85 of 30 is block 25.
    layer: int = field(default=25, metadata={"help": "block whose FFN value matrix (MLP output projection) gets the side memory; negative counts from the top"})
    steps: int = field(default=70, metadata={"help": "most optimisation steps per call (the paper's n_iter)"})
    # The paper's SGD rate is 1.0 (LLaMA-2-7B). Here it makes the side memory answer about 50 on
    # every token of unrelated text (alpha is 5), so routing fires everywhere: on 5 demo edits
    # ES 1.0, PS 0.7, NS 0.2, locality 0.2. With 0.1 unrelated text stays near 1-3: ES 0.8,
    # PS 0.4, NS 0.52, locality 0.52. Neighbours that share the edit prompt's wording (CounterFact's
    # neighbourhood prompts) still fire at their last token at either rate.
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate of the side memory"})
    weight_decay: float = field(default=1e-5, metadata={"help": "SGD weight decay of the side memory's delta"})
    alpha: float = field(default=5.0, metadata={"help": "irrelevant inputs' activation must stay below this (routing loss)"})
    beta: float = field(default=20.0, metadata={"help": "the edit's activation must reach this (routing loss)"})
    gamma: float = field(default=10.0, metadata={"help": "margin between the edit's and irrelevant inputs' activations (routing loss)"})
    act_ratio: float = field(default=0.88, metadata={"help": "threshold eps = act_ratio * the smallest activation of a stored edit"})
    mask_ratio: float = field(default=0.2, metadata={"help": "share of the side memory's entries a shard may change (knowledge sharding)"})
    shard_size: int = field(default=50, metadata={"help": "requests written into one shard before the next shard (a new random mask) starts"})
    density: float = field(default=0.53, metadata={"help": "TIES trimming: share of each shard's entries (of all entries) kept when merging, largest magnitudes first"})
    norm_constraint: float | None = field(default=1.0, metadata={"help": "clamp each entry of the side memory's delta to +-this (null: no clamp)"})
    stop_loss: float = field(default=1e-2, metadata={"help": "stop once the target NLL is below this and every routing margin holds"})
    seed: int = field(default=0, metadata={"help": "seed of the shards' random masks"})
    # On the first 10 demo edits (ES / PS / NS / token locality): without the fact prompts
    # 0.90/0.35/0.74/0.74, with them 0.80/0.15/0.92/0.92: the routing becomes more selective and
    # misses paraphrases as well as neighbours. Off by default (higher S); on for locality first.
    fact_inputs: bool = field(default=False, metadata={"help": "add the built-in fact prompts (questions about other subjects) to the irrelevant inputs"})
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("steps must be >= 0 and lr positive")
        if not 0 < self.mask_ratio <= 1 or not 0 < self.density <= 1:
            raise ValueError(f"mask_ratio ({self.mask_ratio}) and density ({self.density}) must be in (0, 1]")
        if not 0 < self.act_ratio <= 1:
            raise ValueError(f"act_ratio must be in (0, 1], got {self.act_ratio}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.alpha >= self.beta:
            raise ValueError(f"alpha ({self.alpha}) must be below beta ({self.beta})")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"wise": ("editor", "WISEConfig")}
