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
    # Sequential edits of the first 25 records of MEND's zsRE training split, one per call, SGD
    # rate 0.5 (token reliability / generalization / locality after 25; share of the locality
    # probes' positions the memory answers):
    #   shards (mask 0.2, 50 per shard)                               0.67 / 0.52 / 0.87  60%
    #   shards, fact prompts among the irrelevant inputs              0.47 / 0.48 / 0.90  59%
    #   orthogonal to earlier edits' answer inputs only               0.98 / 0.85 / 0.74  50%
    #   + the irrelevant inputs' main directions (0.9 of energy)      0.99 / 0.87 / 0.87  40%
    #   + fact prompts                                                0.98 / 0.84 / 0.95  31%
    #   + 16 locality probes of another part of the split, per call   0.91 / 0.80 / 0.87  27%
    #   the same with per-edit routing (the default)                  0.98 / 0.71 / 0.99  0.5%
    #   0.99 of the irrelevant energy (after 10: 497 of 1536 input directions protected; the
    #   edits no longer fit, 4.2 nats of target NLL left)             0.68 / 0.63 / 0.98
    writing: str = field(default="orthogonal", metadata={"help": "orthogonal: every edit changes the side memory only along inputs orthogonal to earlier edits' answer inputs and to the irrelevant inputs' main directions; shards: the paper's random-mask shards, TIES-merged"})
    # SGD rate. Single edits, first 12 zsRE training records (token reliability / generalization):
    # 0.1 leaves 1.4-6.9 nats of target NLL after 70 steps (0.40 / 0.34); 0.5 fits (0.96 / 0.78);
    # the paper's 1.0 fits too (1.00 / 0.68) with activations twice as large (140-290).
    lr: float = field(default=0.5, metadata={"help": "SGD learning rate of the side memory"})
    weight_decay: float = field(default=1e-5, metadata={"help": "SGD weight decay of the call's change to the side memory"})
    alpha: float = field(default=5.0, metadata={"help": "irrelevant inputs' activation must stay below this (routing loss)"})
    beta: float = field(default=20.0, metadata={"help": "the edit's activation must reach this (routing loss)"})
    gamma: float = field(default=10.0, metadata={"help": "margin between the edit's and irrelevant inputs' activations (routing loss)"})
    act_ratio: float = field(default=0.88, metadata={"help": "threshold eps = act_ratio * the smallest activation of a stored edit"})
    irrelevant_energy: float = field(default=0.9, metadata={"help": "orthogonal writing: share of the irrelevant inputs' energy, top principal directions first, that a call's change must leave alone (0: none)"})
    rank_energy: float = field(default=0.9999, metadata={"help": "orthogonal writing: share of a call's change kept when it is stored as a low-rank product"})
    mask_ratio: float = field(default=0.2, metadata={"help": "shards: share of the side memory's entries a shard may change (knowledge sharding)"})
    shard_size: int = field(default=50, metadata={"help": "shards: requests written into one shard before the next shard (a new random mask) starts"})
    density: float = field(default=0.53, metadata={"help": "shards: TIES trimming, share of each shard's entries (of all entries) kept when merging, largest magnitudes first"})
    norm_constraint: float | None = field(default=None, metadata={"help": "shards: clamp each entry of the side memory's delta to +-this (the paper's 1.0; null: no clamp)"})
    stop_loss: float = field(default=1e-2, metadata={"help": "stop once the target NLL is below this and every routing margin holds"})
    seed: int = field(default=0, metadata={"help": "seed of the shards' random masks and of the sampled irrelevant texts"})
    fact_inputs: bool = field(default=True, metadata={"help": "add the built-in fact prompts (questions about other subjects) to the irrelevant inputs"})
    stand_ins: int = field(default=8, metadata={"help": "per request, its own prompts about other subjects added to the irrelevant inputs (facts of retain_path first, then built-in entities)"})
    retain_path: str | None = field(default=None, metadata={"help": "a file of other facts (such as the training split): its questions stand in first, and its locality probes join the irrelevant inputs"})
    retain_texts: int = field(default=16, metadata={"help": "with retain_path, locality probes of that file added to each call's irrelevant inputs"})
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
        if self.writing not in ("orthogonal", "shards"):
            raise ValueError(f"writing must be 'orthogonal' or 'shards', got {self.writing!r}")
        if self.writing == "orthogonal" and self.norm_constraint is not None:
            raise ValueError("norm_constraint clamps entries of the whole side memory, which would move earlier edits' outputs; it applies to writing: shards only")
        if not 0 <= self.irrelevant_energy < 1 or not 0 < self.rank_energy <= 1:
            raise ValueError(f"irrelevant_energy ({self.irrelevant_energy}) must be in [0, 1) and rank_energy ({self.rank_energy}) in (0, 1]")
        if self.stand_ins < 0 or self.retain_texts < 0:
            raise ValueError("stand_ins and retain_texts must be >= 0")
        if self.alpha >= self.beta:
            raise ValueError(f"alpha ({self.alpha}) must be below beta ({self.beta})")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"wise": ("editor", "WISEConfig")}
