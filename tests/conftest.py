"""Shared fixtures: tiny random Llama models with a tiny offline tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Hello world!",
    "A quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
    "Tensor parallel stages and pipeline stages serve one model over many devices, 0123456789.",
    "Once upon a time there was a tiny model that answered questions about the weather and cats.",
]


def build_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_llama(directory: Path, *, seed: int = 0, num_layers: int = 8, num_heads: int = 4,
                     num_kv_heads: int = 2, hidden_size: int = 64, tie_word_embeddings: bool = False) -> Path:
    """A seeded random Llama (head counts divisible by the TP degrees under test) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=416, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 32,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=tie_word_embeddings, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init give peaked, varied logits
        for param in model.parameters():
            param.mul_(4.0 if param.dim() > 1 else 1.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """8 layers, 4 heads, 2 KV heads, untied embeddings."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """6 layers, 6 heads, 3 KV heads (TP 3 works), tied embeddings."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), seed=1, num_layers=6, num_heads=6,
                            num_kv_heads=3, hidden_size=96, tie_word_embeddings=True)


def deployment(model_dir: Path, *replicas: list[tuple[int, int]], **engine) -> dict:
    """A deployment dict: each replica is a list of (tp, layers) stages on cpu devices."""
    return {
        "model": str(model_dir),
        "replicas": [{"stages": [{"devices": ["cpu"] * tp, "layers": layers} for tp, layers in stages]}
                     for stages in replicas],
        "engine": {"num_kv_blocks": 128, "block_size": 8, **engine},
    }
