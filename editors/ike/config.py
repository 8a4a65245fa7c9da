"""Settings of IKE (Zheng et al., 2023, "Can We Edit Factual Knowledge by In-Context Learning?", EMNLP)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class IKEConfig(EditorConfig):
    # The paper uses k = 32 demonstrations with 6B-parameter models. Every forward pass of the
    # edited model carries the context, so for SmolLM2-135M on a CPU a shorter context (about 30
    # tokens per demonstration) keeps evaluation affordable.
    k: int = field(default=8, metadata={"help": "number of demonstrations chosen from the pool (nearest by cosine similarity)"})
    builtin_pool: bool = field(default=True, metadata={"help": "add the built-in generic counterfactual facts to the demonstration pool"})
    pool_path: str | None = field(
        default=None, metadata={"help": "optional CounterFact-format file whose records join the pool (read once in prepare)"}
    )
    pool_limit: int = field(default=200, metadata={"help": "use at most this many records of pool_path"})
    embed_batch_size: int = field(default=16, metadata={"help": "sentences per forward pass when embedding the pool"})

    def __post_init__(self) -> None:
        if self.k < 0 or self.pool_limit < 0 or self.embed_batch_size < 1:
            raise ValueError("k and pool_limit must be >= 0 and embed_batch_size >= 1")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"ike": ("editor", "IKEConfig")}
