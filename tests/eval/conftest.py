"""Tiny offline fixtures for the evaluation tests: a 2-layer Llama with a small BPE tokenizer.

Real sizes for orientation: SmolLM2-135M (Llama) 30 layers, hidden 576, 9 heads, 3 KV heads,
head_dim 64, vocab 49152. Here: 2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16, vocab 300.
"""

from __future__ import annotations

import pytest

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the "
    "clouds that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows "
    "bound with victorious wreaths; our bruised arms hung up for monuments; our stern alarums "
    "changed to merry meetings, our dreadful marches to delightful measures. "
) * 12


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory with a seeded random tiny Llama and its tokenizer (``from_pretrained``-able)."""
    import torch
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [TEXT, "0123456789 The special magic number is"],
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<pad>", "<s>", "</s>"],
    )
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(out)
    cfg = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``(model, tokenizer)`` loaded through :func:`kvq.eval.models.load`."""
    from kvq.eval.models import load

    return load(str(tiny_dir))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "richard.txt"
    path.write_text(TEXT)
    return path
