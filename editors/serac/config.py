"""Settings of SERAC (Mitchell et al., 2022, "Memory-Based Model Editing at Scale", ICML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from factedit.editors.config import LearnedConfig


@dataclass
class SERACConfig(LearnedConfig):
    # Defaults for SmolLM2-135M (30 blocks, hidden 576), chosen by the measurements in
    # editors/serac/network.py: the classifier reads the prefix mean of block 8's unit states; the
    # counterfactual model is the whole model with a trainable copy of its top 4 blocks (14.2M
    # parameters; see editors/serac/__init__.py for the counts), which trains on a 2-core CPU.
    classifier_layer: int = field(
        default=8, metadata={"help": "block whose output is the scope classifier's feature (pooled over the prefix); negative counts from the top"}
    )
    classifier_pooling: str = field(
        default="mean", metadata={"help": "the feature of a position: 'mean' of the unit-normalised block outputs over its prefix, or 'last' (its own)"}
    )
    embedding_dim: int = field(default=256, metadata={"help": "width of the scope classifier's learned projection"})
    cf_layers: int = field(
        default=4, metadata={"help": "top blocks of the model copied (and fine-tuned) in the counterfactual model; the blocks below stay frozen and shared"}
    )
    separator: str = field(default="\n", metadata={"help": "text between the stored edit and the input in the counterfactual model's input"})
    init_scale: float = field(
        default=20.0, metadata={"help": "initial slope of the in-scope logit, scale * (cosine - threshold) (learned during training)"}
    )
    init_threshold: float = field(
        default=0.95, metadata={"help": "initial cosine above which an input is in scope (learned); untrained, routing is near exact match"}
    )
    targets: dict[str, str] | None = field(default=None, metadata={"help": "overrides of the architecture table, role -> module template"})

    # Beyond the parameter shapes (embedding_dim, cf_layers), a checkpoint is only valid for the
    # features it was trained on (classifier_layer, classifier_pooling) and the input layout it learned (separator).
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("classifier_layer", "classifier_pooling", "embedding_dim", "cf_layers", "separator", "targets")

    def __post_init__(self) -> None:
        if self.embedding_dim < 1 or self.cf_layers < 1:
            raise ValueError("embedding_dim and cf_layers must be at least 1")
        if self.classifier_pooling not in ("mean", "last"):
            raise ValueError(f"classifier_pooling must be 'mean' or 'last', got {self.classifier_pooling!r}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale}")
        if not -1.0 <= self.init_threshold <= 1.0:
            raise ValueError(f"init_threshold is a cosine similarity in [-1, 1], got {self.init_threshold}")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"serac": ("editor", "SERACConfig")}
