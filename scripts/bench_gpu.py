"""Time and memory of editing on a GPU for models shaped like the default model, GPT-2 XL and LLaMA-7B.

    python scripts/bench_gpu.py [--shapes smollm2-135m gpt2-xl llama-7b] [--tokenizer DIR] [--json OUT]

Each model is built from its configuration with random weights directly on the device, so nothing
is downloaded and a 7B model is ready in seconds. Time and memory depend on the shapes, not on the
weights' values, with one exception: the optimisation loops that stop once the new target is
reached (FT-M's, ROME's value vector) run their full step count on random weights, so their
seconds are upper bounds for a trained model. For each shape and dtype it prints the weights'
memory, greedy decoding in ms per decoding step (batch 1 and 16, with the KV cache), and for FT-M
(25 steps at most) and ROME (the editor settings of ``configs/rome/counterfact.yaml``, ``gpt2-xl.yaml``
and ``llama-7b.yaml``: layer, value steps, weight decay) the
seconds of one edit and the peak memory allocated on the device; ROME's key statistics (256 texts
of 128 tokens sampled from the model, as ``stats_corpus: model``) are timed apart, since a run
computes them once. ``--tokenizer`` is any tokenizer folder (the default model's is saved by
``--save-tokenizer DIR`` on a machine that has it); its ids must fit the smallest vocabulary, so
the LLaMA-7B shape gets the tokenizer's vocabulary size (49,152 for SmolLM2's, 2% more weights
than LLaMA's 32,000; stated in the output).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_scoring import decode_ms_per_token  # noqa: E402  (this folder is on sys.path when run as a script)

# shape name -> (transformers config class, its arguments, ROME settings: a config file of configs/rome/
# whose editor block is used, or the settings themselves; FT-M layer)
SHAPES = {
    "smollm2-135m": (
        "LlamaConfig",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
        "configs/rome/counterfact.yaml", 3,
    ),
    "gpt2-xl": (
        "GPT2Config",
        dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
        "configs/rome/gpt2-xl.yaml", 21,
    ),
    "llama-7b": (
        "LlamaConfig",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False),
        "configs/rome/llama-7b.yaml", 21,
    ),
    "tiny-llama": (  # a smoke test of this script on any machine
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512),
        {"layer": 1}, 1,
    ),
}


def rome_settings(source: str | dict) -> dict:
    """ROME's settings for a shape: the ``editor`` block of a config file (its ``name`` aside)."""
    if isinstance(source, dict):
        return source
    import yaml

    editor = yaml.safe_load((ROOT / source).read_text())["editor"]
    return {key: value for key, value in editor.items() if key != "name"}


def build(shape: str, vocab: int, dtype: torch.dtype, device: torch.device):
    import transformers

    class_name, kwargs, _, ft_layer = SHAPES[shape]
    kwargs = dict(kwargs)
    if class_name == "LlamaConfig":
        kwargs["vocab_size"] = vocab
    config = getattr(transformers, class_name)(**kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    return model, ft_layer


def timed_edit(editor, model, tokenizer, request, config, device) -> tuple[float, float]:
    """Seconds and peak memory (GiB: allocated on a GPU, the process's RSS on a CPU) of one edit,
    reverted afterwards."""
    from factedit.evaluation.efficiency import measure

    with measure(device) as cost:
        edit = editor.apply(model, tokenizer, [request], config)
    edit.revert(model)
    return cost.seconds, cost.peak_memory_mb / 1024


def bench(shape: str, dtype_name: str, tokenizer, device: torch.device) -> dict:
    from factedit.editors import EditRequest, get_editor
    from factedit.evaluation.efficiency import measure

    dtype = getattr(torch, dtype_name)
    row: dict = {"shape": shape, "dtype": dtype_name, "device": str(device)}
    with measure(device) as cost:
        model, ft_layer = build(shape, len(tokenizer), dtype, device)
    row["build_seconds"] = round(cost.seconds, 1)
    row["parameters_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    row["weights_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)
    request = EditRequest(case_id="bench", prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                          target_new="English", target_true="French")
    for batch in (1, 16):
        try:  # a decoding step serves the whole batch
            row[f"decode_ms_per_step_batch{batch}"] = round(decode_ms_per_token(model, tokenizer, batch, new_tokens=64) * batch, 2)
        except Exception as error:  # report and go on: one failure must not hide the other figures
            row[f"decode_ms_per_step_batch{batch}"] = f"failed: {type(error).__name__}: {error}"[:200]
    ft = get_editor("ft_m")
    try:
        timed_edit(ft(), model, tokenizer, request, ft.config_class(layers=[ft_layer], steps=2), device)  # warm-up
        seconds, peak = timed_edit(ft(), model, tokenizer, request, ft.config_class(layers=[ft_layer]), device)
        row.update(ft_m_edit_seconds=round(seconds, 2), ft_m_peak_gb=round(peak, 2))
    except Exception as error:
        row["ft_m"] = f"failed: {type(error).__name__}: {error}"[:300]
    rome = get_editor("rome")
    try:
        config = rome.config_class(**rome_settings(SHAPES[shape][2]))
        editor = rome()
        with measure(device) as cost:
            editor.prepare(model, tokenizer, config)
        row["rome_statistics_seconds"] = round(cost.seconds, 1)
        seconds, _ = timed_edit(editor, model, tokenizer, request, config, device)
        row["rome_first_edit_seconds"] = round(seconds, 2)
        seconds, peak = timed_edit(editor, model, tokenizer, request, config, device)
        row.update(rome_edit_seconds=round(seconds, 2), rome_peak_gb=round(peak, 2))
    except Exception as error:
        row["rome"] = f"failed: {type(error).__name__}: {error}"[:300]
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "gpt2-xl", "llama-7b"], choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="float32, bfloat16, float16")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the default model's)")
    parser.add_argument("--save-tokenizer", default=None, help="save the default model's tokenizer into this folder and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    if args.save_tokenizer:
        from factedit.models import load_tokenizer

        load_tokenizer().save_pretrained(args.save_tokenizer)
        print(f"saved the default model's tokenizer to {args.save_tokenizer}")
        return
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from factedit.models import load_tokenizer

        tokenizer = load_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; random weights, tokenizer vocabulary {len(tokenizer)}")
    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            row = bench(shape, dtype, tokenizer, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
