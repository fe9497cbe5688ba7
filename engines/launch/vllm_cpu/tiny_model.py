"""Build a tiny, deterministic, random-weight Llama model directory for vLLM (no hub access).

Run with the vLLM environment's Python (it needs torch, safetensors and tokenizers):
``python tiny_model.py OUT_DIR`` (``pdgate engine vllm-setup`` does it).

Produces in OUT_DIR:
  config.json              LlamaForCausalLM config (bfloat16, max_position_embeddings 2048)
  generation_config.json   bos/eos/pad ids, no sampling defaults
  model.safetensors        random weights, seeded (torch.Generator seed 0, per-tensor offsets)
  tokenizer.json           byte-level BPE trained with `tokenizers` on a fixed, generated corpus
  tokenizer_config.json    PreTrainedTokenizerFast, bos/eos/pad/unk, simple chat template
  special_tokens_map.json

Only needs: torch, safetensors, tokenizers (transformers not required).
Same inputs give byte-identical files; the printed sha256 covers them all.
The embeddings and the LM head have unit variance so that greedy choices are far apart in
bfloat16 (no near-ties that would make a PD hand-off and a single engine disagree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Iterator

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "more",
    "can",
    "out",
    "up",
    "into",
    "do",
    "any",
    "your",
    "what",
    "some",
    "time",
    "could",
    "them",
    "other",
    "than",
    "then",
    "now",
    "only",
    "its",
    "cache",
    "block",
    "token",
    "prefill",
    "decode",
    "request",
    "router",
    "server",
    "engine",
    "model",
    "prompt",
    "stream",
    "latency",
    "memory",
    "queue",
    "worker",
    "batch",
    "tensor",
    "layer",
    "hidden",
    "vector",
    "score",
    "policy",
    "route",
    "load",
    "balance",
    "python",
    "rust",
    "kernel",
    "thread",
    "socket",
    "metric",
    "event",
    "hash",
    "prefix",
    "transfer",
    "remote",
    "local",
    "greedy",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "lambda",
    "sigma",
    "omega",
    "red",
    "green",
    "blue",
    "black",
    "white",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hundred",
    "thousand",
    "million",
    "apple",
    "river",
    "mountain",
    "cloud",
    "stone",
    "forest",
    "ocean",
    "window",
    "garden",
    "city",
    "road",
    "bridge",
    "light",
    "night",
]


def corpus(n_lines: int = 4000, seed: int = 1234) -> Iterator[str]:
    rng = random.Random(seed)
    punct = [".", ",", "!", "?", ":", ";"]
    for i in range(n_lines):
        k = rng.randint(4, 20)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, k), str(rng.randint(0, 99999)))
        line = " ".join(words) + rng.choice(punct)
        if i % 7 == 0:
            line = line.capitalize()
        yield line


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus()), trainer=trainer)
    return tok


def build_weights(cfg: dict, seed: int = 0) -> dict:
    h, inter, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    shapes = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,), "lm_head.weight": (V, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    out = {}
    for j, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float32)
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            # embeddings/lm_head a bit larger so greedy argmax is well separated (no bf16 near-ties)
            std = 1.0 if name in ("model.embed_tokens.weight", "lm_head.weight") else 0.05
            t = torch.randn(shape, generator=g, dtype=torch.float32) * std
        out[name] = t.to(torch.bfloat16).contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--max-pos", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tok = build_tokenizer(args.vocab)
    V = tok.get_vocab_size()
    # round vocab to a multiple of 64 for the embedding (extra rows are never produced by the tokenizer)
    V_model = (V + 63) // 64 * 64
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    tok.save(os.path.join(args.out, "tokenizer.json"))

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "vocab_size": V_model,
        "max_position_embeddings": args.max_pos,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "transformers_version": "4.46.0",
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump(
            {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"], "do_sample": False},
            f,
            indent=2,
            sort_keys=True,
        )

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": args.max_pos,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": SPECIALS[4:],
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "special_tokens_map.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "additional_special_tokens": SPECIALS[4:],
            },
            f,
            indent=2,
            sort_keys=True,
        )

    w = build_weights(cfg, args.seed)
    save_file(w, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    digest = hashlib.sha256()
    for fn in sorted(os.listdir(args.out)):
        with open(os.path.join(args.out, fn), "rb") as f:
            digest.update(fn.encode() + b"\0" + f.read())
    n_params = sum(t.numel() for t in w.values())
    print(
        json.dumps(
            {
                "out": args.out,
                "tokenizer_vocab": V,
                "model_vocab": V_model,
                "params": n_params,
                "special_ids": ids,
                "sha256": digest.hexdigest(),
            }
        )
    )


if __name__ == "__main__":
    main()
