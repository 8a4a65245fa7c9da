"""Context prefixes and subject positions shared by ROME-family editors.

ROME (Meng et al., 2022, section 3.1) averages the key over the subject appearing after a set of
short texts sampled from the model itself, so that the edit does not depend on one exact
phrasing, and optimises the value with the same prefixes. Both need the position of the
subject's last token in each tokenized text.
"""

from __future__ import annotations


import torch

from factedit.batches import pad_id, start_id

from ..core.lm import model_device


def sample_prefixes(model, tokenizer, count: int, length: int, seed: int = 0, top_k: int = 5) -> list[str]:
    """``count`` short texts of ``length`` tokens sampled from ``model`` (top-k), each ending ". ".

    Sampling starts from the tokenizer's BOS token (EOS if it has none), as ROME's does from
    GPT-2's ``<|endoftext|>``. Braces are removed so the texts are safe in format strings.
    """
    if count <= 0:
        return []
    start = start_id(tokenizer)
    device = model_device(model)
    input_ids = torch.full((count, 1), start, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad_id(tokenizer),
            )
    texts = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return [" ".join(t.replace("{", "").replace("}", "").split()) + ". " for t in texts]


def subject_last_index(tokenizer, text: str, subject: str, start: int = 0) -> int:
    """Index of the token holding the last character of the first ``subject`` at or after ``start``.

    ``text`` is tokenized exactly as :func:`editors.lm.encode_pair` tokenizes a prompt.
    """
    char = text.find(subject, start)
    if char < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    last_char = char + len(subject) - 1
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True)
        for index, (begin, end) in enumerate(encoded["offset_mapping"]):
            if begin <= last_char < end:
                return index
    # Slow tokenizers (or a subject end inside a special token): ROME's rule, the length of the
    # tokenized text up to the subject's end, minus one.
    return len(tokenizer(text[: last_char + 1])["input_ids"]) - 1


