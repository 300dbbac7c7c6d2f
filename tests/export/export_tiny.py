"""A tiny Llama and calibration tokens built identically in any environment (seeded torch only,
no transformers initialisation), shared by the tests and by the llm-compressor fixture script.

Real size for orientation: SmolLM2-135M has 30 layers, 3 KV heads, head_dim 64.
"""

from __future__ import annotations

#: calibration text (Shakespeare, Sonnet 18, public domain); token id = byte % VOCAB
TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a "
    "date; Sometime too hot the eye of heaven shines, And often is his gold complexion dimm'd; "
    "And every fair from fair sometime declines, By chance or nature's changing course "
    "untrimm'd; But thy eternal summer shall not fade, Nor lose possession of that fair thou "
    "ow'st; Nor shall death brag thou wander'st in his shade, When in eternal lines to time "
    "thou grow'st: So long as men can breathe or eyes can see, So long lives this, and this "
    "gives life to thee."
)
VOCAB, WINDOW = 96, 64
CONFIG = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def calibration_ids():
    """(windows, WINDOW) int64 token ids of :data:`TEXT`."""
    import torch

    ids = torch.tensor([b % VOCAB for b in TEXT.encode()], dtype=torch.long)
    n = ids.numel() // WINDOW
    return ids[: n * WINDOW].view(n, WINDOW)


def tiny_llama():
    """The tiny Llama in fp32 with seeded weights (norms near 1, the rest N(0, 0.1^2))."""
    import torch
    import transformers as tf

    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()
    g = torch.Generator().manual_seed(1234)
    state = model.state_dict()
    for name in sorted(state):
        t = torch.randn(state[name].shape, generator=g)
        state[name] = 1 + 0.1 * t if name.endswith("norm.weight") else 0.1 * t
    model.load_state_dict(state)
    return model
