"""The sparse outlier store through KVQCache: folded blocks, merged segments, decode."""

import torch
from hf_models import tiny_model

import kvq
from kvq.hf import KVQCache
from kvq.testing import sqnr_db


def test_sparse_pipelines_in_the_cache():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 45), generator=torch.Generator().manual_seed(0))
    cfg = kvq.kv({"keys": "sparse(0.02,channel)>pchan>int8", "values": "sparse(0.02)>ptok>int8"})
    with torch.no_grad():
        ref = model(ids).logits
        cache = KVQCache(cfg, model.config, residual=0, block=16)
        out = model(ids, past_key_values=cache).logits
        for _ in range(20):  # decode: blocks quantized one by one and merged into segments
            nxt = model(ids[:, -1:], past_key_values=cache).logits
    assert sqnr_db(ref, out) > 25 and torch.isfinite(nxt).all()
    assert cache.get_seq_length() == 65
    layer = cache.layers[0]
    assert layer.k_store.nbytes == sum(s.q.nbytes for s in layer.k_store.segments)
    cache.crop(-7)
    assert cache.get_seq_length() == 58
