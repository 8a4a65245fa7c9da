"""Settings of CaliNET (Dong et al., 2022, "Calibrating Factual Knowledge in Pretrained Language Models", Findings of EMNLP)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EditorConfig


@dataclass
class CaliNETConfig(EditorConfig):
    # Defaults for SmolLM2-135M (30 blocks, hidden 576, MLP 1536): see the module docstring.
    layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "blocks whose FFN gets calibration slots; negative counts from the top (the top block alone trains without running any block)"},
    )
    n_slots: int = field(default=256, metadata={"help": "calibration memory slots per layer"})
    steps: int = field(default=100, metadata={"help": "maximum optimisation steps"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate for the slots' keys and values"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay on the slots"})
    bias: bool = field(default=False, metadata={"help": "give each slot a trainable bias (starting at zero), so that it can stay silent on most inputs; the paper's slots have none"})
    activation: str = field(default="gelu", metadata={"help": "slot activation: relu, gelu, gelu_tanh, silu"})
    rephrases: bool = field(default=True, metadata={"help": "also train on each request's rephrase prompts"})
    retain_weight: float = field(default=20.0, metadata={"help": "weight of the KL divergence that keeps the retained prompts' next-token distributions (0 turns retention off: the paper's objective alone)"})
    stand_ins: int = field(default=16, metadata={"help": "retained prompts per request: questions about other subjects (from retain_path, then its own prompts about built-in named entities)"})
    retain_path: str | None = field(
        default=None,
        metadata={
            "help": "a file of other facts (any record format edit.py reads; not the evaluation file) for the retained prompts: its facts with "
            "the request's true answer, as the file asks them, and the request's prompt about the file's subjects of the same wording, before "
            "the built-in entities; e.g. ../shared/data/counterfact/easyedit/counterfact-train.json"
        },
    )
    retain_generic: bool = field(default=True, metadata={"help": "also retain generic sentences (every position) and built-in factual questions about other subjects"})
    chunk_tokens: int = field(default=4096, metadata={"help": "padded tokens per training pass: sequences of similar lengths are batched together and each step sums their gradients"})
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
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.retain_weight < 0 or self.stand_ins < 0:
            raise ValueError(f"retain_weight and stand_ins must be >= 0, got {self.retain_weight} and {self.stand_ins}")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"calinet": ("editor", "CaliNETConfig")}
