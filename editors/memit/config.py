"""Settings of MEMIT and of the methods built on its machinery (PMET, AlphaEdit)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rome.config import LocateConfig


@dataclass
class MEMITConfig(LocateConfig):
    # SmolLM2-135M: see configs/memit/README.md for how the layers were chosen.
    layers: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6], metadata={"help": "blocks whose MLP output projections share the update"})
    clamp_norm_factor: float = field(default=0.75, metadata={"help": "|delta| is clamped to this multiple of the residual's norm"})
    # A key k is written with strength a / (1 + a), a = k^T C^-1 k / lambda, and k^T C^-1 k is about
    # the key dimension: MEMIT's 15000 for GPT-J (d_ff 16384) corresponds to about 1500 for
    # SmolLM2-135M (d_ff 1536). Measured on the 30 demo edits in one call: lambda 15000 gives
    # ES 0.50, 1500 gives ES 0.97 with NS 0.93.
    mom2_update_weight: float = field(default=1500.0, metadata={"help": "lambda: weight of the preserved keys' covariance against the new keys (eq. 14)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be distinct and increasing, got {self.layers}")
        if self.mom2_update_weight < 0:
            raise ValueError("mom2_update_weight must be >= 0")


@dataclass
class PMETConfig(MEMITConfig):
    """PMET's settings (:mod:`editors.memit.pmet`): MEMIT's, with each optimised vector clamped
    relative to its own module's output."""

    clamp_norm_factor: float = field(default=4.0, metadata={"help": "each vector's norm is clamped to this multiple of its module's output norm"})


@dataclass
class AlphaEditConfig(MEMITConfig):
    """AlphaEdit's settings (:mod:`editors.memit.alphaedit`): MEMIT's, plus the null-space projection."""

    nullspace_threshold: float = field(default=2e-2, metadata={"help": "eigenvalues of C below this span the preserved keys' null space"})
    l2: float = field(default=10.0, metadata={"help": "alpha: ridge term of the update"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0 or self.l2 < 0:
            raise ValueError("nullspace_threshold must be > 0 and l2 >= 0")


# What this package registers: method name -> (the module of this package whose import registers
# it, its config class above). The editor registry reads this to find the method.
REGISTERS = {"memit": ("editor", "MEMITConfig"), "pmet": ("pmet", "PMETConfig"), "alphaedit": ("alphaedit", "AlphaEditConfig")}
