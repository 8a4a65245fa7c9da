"""Print how long loading the default model takes: first load (dequantize + cache) and cached load.

    python scripts/bench_model_load.py            # uses a temporary cache, so the first load is cold
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FACTEDIT_CACHE"] = cache
        from factedit.models import load_model

        timings = []
        for label in ("first load (dequantize GGUF, write safetensors)", "second load (cached)", "third load (cached)"):
            start = time.perf_counter()
            load_model("smollm2-135m", device="cpu")
            timings.append(time.perf_counter() - start)
            print(f"{label:<50} {timings[-1]:6.2f} s")
        print(f"cached / first: {timings[1] / timings[0]:.3f}")


if __name__ == "__main__":
    main()
