"""Tiny random models (2 layers, hidden 64) of every family KVQCache is tested with.

Real sizes for orientation: SmolLM2-135M (Llama) 30 layers, hidden 576, 9 heads, 3 KV heads.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_configs() -> dict:
    """Family name -> config; head_dim 16 everywhere (DeepSeek-V3 caches a 16-wide latent as keys
    and its 8 rotary channels as values); grouped / multi-query KV where the family has it."""
    llama_like = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, **COMMON)
    return {
        "gpt2": tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, **COMMON),
        "opt": tf.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                            ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=128,
                            **COMMON),
        "gpt_neox": tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=96, rotary_pct=0.25,
                                     max_position_embeddings=128, **COMMON),
        "qwen2": tf.Qwen2Config(**llama_like),
        "llama": tf.LlamaConfig(**llama_like),
        "mistral": tf.MistralConfig(**llama_like, sliding_window=12),
        "falcon": tf.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  **COMMON),  # multi-query: one KV head
        "gptj": tf.GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=128,
                              **COMMON),
        "phi3": tf.Phi3Config(**llama_like),
        "gemma": tf.GemmaConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=16),
        # hybrid sliding / full layers (windows larger than the tests' sequences; the small
        # windows are in sliding_configs), q/k norms before RoPE, interleaved rotary, MLA, MoE
        "gemma2": tf.Gemma2Config(**{**llama_like, "num_key_value_heads": 1}, head_dim=16),
        "gemma3": tf.Gemma3TextConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=16,
                                      layer_types=["sliding_attention", "full_attention"]),
        "qwen3": tf.Qwen3Config(**llama_like, head_dim=16),
        "cohere": tf.CohereConfig(**llama_like, use_qk_norm=True),
        "cohere2": tf.Cohere2Config(**llama_like,
                                    layer_types=["sliding_attention", "full_attention"]),
        "olmo2": tf.Olmo2Config(**llama_like),
        "smollm3": tf.SmolLM3Config(**llama_like, no_rope_layers=[1, 0]),
        "gpt_oss": tf.GptOssConfig(**llama_like, head_dim=16, num_local_experts=4,
                                   num_experts_per_tok=2,
                                   layer_types=["sliding_attention", "full_attention"]),
        "deepseek_v3": tf.DeepseekV3Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, **COMMON),
    }


def sliding_configs() -> dict:
    """Hybrid / sliding-window models with small windows, so tests pass them quickly:
    Gemma-3-like (sliding layers with their own local rotary, one full layer; 1 KV head) and
    Mistral-like (every layer slides)."""
    return {
        "gemma3_sliding": tf.Gemma3TextConfig(
            num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, intermediate_size=96, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"], **COMMON),
        "mistral_sliding": tf.MistralConfig(num_hidden_layers=2, hidden_size=64,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=96, sliding_window=10, **COMMON),
    }


_MODELS: dict = {}


def tiny_model(family: str):
    """A seeded random model in eval mode (built once per session)."""
    if family not in _MODELS:
        torch.manual_seed(0)
        configs = {**family_configs(), **sliding_configs()}
        _MODELS[family] = tf.AutoModelForCausalLM.from_config(configs[family]).eval()
    return _MODELS[family]


def left_padded(batch: int = 2, seq: int = 20, pads=(0, 5), seed: int = 0):
    """(input_ids, attention_mask) with ``pads[i]`` left pad tokens in row i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i, p in enumerate(pads[:batch]):
        ids[i, :p], mask[i, :p] = 0, 0
    return ids, mask
