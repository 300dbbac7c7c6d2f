"""Pinned definitions from vLLM 0.33.0 (Apache-2.0), copied with their source lines.

Wheel: vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl, sha256 4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa
(pip download vllm==0.33.0 --no-deps). vLLM as a whole does not import without its CUDA
extensions, so kvq's tests use these copies; tests/export/test_vllm_peers.py checks kvq's
export tables against them.
"""

# vllm/config/cache.py, CacheDType = Literal[...] (the accepted --kv-cache-dtype values)
CACHE_DTYPES = ('auto', 'float16', 'bfloat16', 'fp8', 'fp8_e4m3', 'fp8_e5m2', 'fp8_inc', 'fp8_ds_mla', 'nvfp4_ds_mla', 'turboquant_k8v4', 'turboquant_4bit_nc', 'turboquant_k3v4_nc', 'turboquant_3bit_nc', 'octave_k3v4', 'octave_k3v3', 'octave_k3v3_compact', 'ultraquant_4bit', 'int4_per_token_head', 'int8_per_token_head', 'fp8_per_token_head', 'nvfp4', 'nvfp4_4over6')


def layer_kv_cache_dtype(kv_cache_dtype: str, layer_idx: int, skip_layers: list[str]) -> str:
    """The dtype of one attention layer: vllm/model_executor/layers/attention/attention.py
    (Attention.__init__, lines 299-315 of 0.33.0; the sliding-window case left out)::

        layer_idx = extract_layer_index(prefix)
        if str(layer_idx) in cache_config.kv_cache_dtype_skip_layers:
            skip = True
        if skip:
            kv_cache_dtype = "auto"
    """
    return "auto" if str(layer_idx) in skip_layers else kv_cache_dtype


def effective_skip_layers(kv_cache_dtype: str, skip_layers: list[str], boundary: list[str]
                          ) -> list[str]:
    """vllm/engine/arg_utils.py (create_engine_config, 0.33.0)::

        uses_packed_kv_backend = (resolved_cache_dtype.startswith("turboquant_")
                                  or resolved_cache_dtype == "ultraquant_4bit")
        if uses_packed_kv_backend:
            boundary = TurboQuantConfig.get_boundary_skip_layers(model_config)
            cache_config.kv_cache_dtype_skip_layers = sorted(
                set(cache_config.kv_cache_dtype_skip_layers) | set(boundary))
    """
    if kv_cache_dtype.startswith("turboquant_") or kv_cache_dtype == "ultraquant_4bit":
        return sorted(set(skip_layers) | set(boundary))
    return skip_layers
