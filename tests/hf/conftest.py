"""Fixtures for the kvq.hf tests; the tiny models live in hf_models.py."""

from __future__ import annotations

import pytest
from hf_models import tiny_model

import kvq.hf.flash_decode as flash_decode


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def count_fast(monkeypatch):
    """Number of decode steps served by the torch fast path."""
    calls = []
    orig = flash_decode.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(flash_decode, "decode_attention", counted)
    return calls


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    """(tokenizer, text file): a small byte-level BPE trained on the text (vocab 300)."""
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    text = ("Now is the winter of our discontent made glorious summer by this sun of York; and "
            "all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
            ) * 16
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator([text], vocab_size=300, min_frequency=1,
                                special_tokens=["<pad>", "<s>", "</s>"])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, pad_token="<pad>",
                                     bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return tok, path
