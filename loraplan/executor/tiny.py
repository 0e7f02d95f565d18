"""Tiny random-weight models with a tokenizer built offline: for `run --demo` and for the tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a second on a small corpus (so every string
encodes, with no unknown tokens), wrapped in `PreTrainedTokenizerFast` and saved beside the weights.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Iterable, Optional

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def demo_data_path(name: str = "demo.jsonl") -> str:
    """Path of a data file shipped under executor/data/."""
    return str(resources.files("loraplan.executor") / "data" / name)


def _demo_corpus() -> list[str]:
    texts = []
    with open(demo_data_path(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.extend(str(v) for v in row.values())
    # The instruction template's scaffolding and the chat fallback's role names, so they get merged tokens.
    texts += ["### Instruction:", "### Input:", "### Response:", "### System:", "### User:", "### Assistant:"]
    return texts


def build_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus` (default: the demo data), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else _demo_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2):
    """A Hugging Face config of a tiny model of the given family (llama, qwen2 or mixtral for a MoE)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: with a frozen random LM head of std 0.02 a 64-wide model cannot produce a peaked
        # distribution at all, and the demo's loss could barely fall.
        initializer_range=0.25,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(f"unknown tiny architecture {arch!r} (llama, qwen2 or mixtral)")


def build_tiny_model(
    out_dir: str,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    corpus: Optional[Iterable[str]] = None,
    vocab_size: int = 512,
    chat_template: Optional[str] = None,
) -> str:
    """Save a random-weight model and its tokenizer to `out_dir` (a model directory `run` can load)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .train import quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = tiny_config(arch, vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
