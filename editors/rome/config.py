"""Settings of the ROME family (ROME here; MEMIT, PMET and AlphaEdit extend them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class LocateConfig(EditorConfig):
    """What every locate-then-edit method shares: value optimisation, context prefixes, statistics."""

    # -- the target value v* (ROME section 3.1, eq. 4) -------------------------------------------
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate of the value vector"})
    v_steps: int = field(default=20, metadata={"help": "maximum optimisation steps of the value vector"})
    v_weight_decay: float = field(default=0.5, metadata={"help": "weight of the norm penalty |delta| / |v0|^2"})
    kl_factor: float = field(default=0.0625, metadata={"help": "weight of the essence-drift KL term"})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "|delta| is clamped to this multiple of |v0|"})
    stop_loss: float = field(default=5e-2, metadata={"help": "a request stops optimising once its target NLL falls below this"})
    kl_prompt: str = field(default="{} is a", metadata={"help": "essence prompt; {} is the subject"})
    # -- context prefixes (ROME section 3.1: the key is averaged over them) ---------------------
    context_count: int = field(default=5, metadata={"help": "prefixes sampled from the model besides the bare prompt (MEMIT samples 5; ROME's code 20)"})
    context_length: int = field(default=10, metadata={"help": "tokens per sampled prefix"})
    seed: int = field(default=0, metadata={"help": "seed for sampling the prefixes"})
    batch_requests: int = field(default=32, metadata={"help": "requests whose values are optimised in one batch"})
    # -- key statistics C = E[k k^T] ---------------------------------------------------------------
    mom2_adjustment: bool = field(default=True, metadata={"help": "weight the update by the inverse key covariance"})
    stats_corpus: str = field(
        default="model",
        metadata={"help": "'model' (text sampled from the model), a local .txt/.jsonl file or folder, or 'hf:<dataset>[:<config>[:<split>]]'"},
    )
    stats_samples: int = field(default=256, metadata={"help": "texts of the corpus used for the statistics"})
    stats_max_length: int = field(default=128, metadata={"help": "tokens per statistics text"})
    stats_npz: dict[int, str] | None = field(
        default=None, metadata={"help": "layer -> precomputed statistics in ROME's .npz layout (overrides stats_corpus)"}
    )
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    def __post_init__(self) -> None:
        if self.v_steps < 1 or self.v_lr <= 0:
            raise ValueError("v_steps must be >= 1 and v_lr > 0")
        if self.clamp_norm_factor <= 0:
            raise ValueError("clamp_norm_factor must be > 0")
        if "{}" not in self.kl_prompt:
            raise ValueError(f"kl_prompt must contain '{{}}' for the subject, got {self.kl_prompt!r}")
        if self.context_count < 0 or self.context_length < 1:
            raise ValueError("context_count must be >= 0 and context_length >= 1")
        if self.batch_requests < 1 or self.stats_samples < 1:
            raise ValueError("batch_requests and stats_samples must be >= 1")


@dataclass
class ROMEConfig(LocateConfig):
    # SmolLM2-135M: see configs/rome/README.md for how the layer was chosen.
    layer: int = field(default=4, metadata={"help": "block whose MLP output projection is edited"})


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"rome": ("editor", "ROMEConfig")}
