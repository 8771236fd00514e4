"""A tiny random decoder and a byte-level tokenizer, built in memory (runtime layer, no download).

Tests and the offline causal-LM demo need a decoder without a hub. This one is a 2-layer LLaMA
(hidden 64, 4 heads, 115k parameters) with random weights drawn from a fixed seed, so the server
and every Ray actor build bit-identical base weights without sharing a file. Its tokenizer maps
every byte to one token (256 tokens plus ``<pad>``, ``<s>``, ``</s>``): it needs no training, handles
any text, and decodes exactly what was encoded. :func:`save_tiny_base` writes both in Hugging Face
format so that a run's adapter can be reloaded with plain transformers + peft.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_NAME = "tiny-random-llama"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
HIDDEN, LAYERS, HEADS, MLP = 64, 2, 4, 128
MAX_POSITIONS = 1024
# Weight std. LLaMA's 0.02 suits wide models; at width 64 it caps every logit near +-1 (the output
# layer sees a normalised 64-d state), so no adapter could make a confident prediction and the
# held-out perplexity barely moves. With 0.2 a LoRA on the attention projections lowers it
# markedly within a few hundred steps; much larger values start from random logits so large that
# the adapter spends its steps undoing them (tried: 0.02, 0.1, 0.2, 0.3, 0.5, 1.0).
INIT_STD = 0.2


def build_tiny_tokenizer():  # noqa: ANN201 - a transformers fast tokenizer
    """Return the byte-level tokenizer: ids 0..2 are the special tokens, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    # ByteLevel's alphabet is 256 printable stand-ins, one per byte; a BPE with no merges keeps
    # each byte a token, and the ByteLevel decoder maps them back to the original text.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   model_max_length=MAX_POSITIONS)


def build_tiny_decoder(seed: int) -> torch.nn.Module:
    """Return the tiny LLaMA causal LM with weights drawn from ``seed`` (fp32, eval mode).

    The global torch RNG is restored afterwards, so building it never shifts a run's random draws.
    """
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        vocab_size=3 + 256, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.set_rng_state(state)
    model.eval()
    return model


def save_tiny_base(path: str | Path, seed: int) -> Path:
    """Write the tiny base model and its tokenizer to ``path`` (loadable with ``from_pretrained``)."""
    path = Path(path)
    build_tiny_decoder(seed).save_pretrained(str(path))
    build_tiny_tokenizer().save_pretrained(str(path))
    return path
