import pytest

from kvq.eval.errors import EvalError
from kvq.eval.pipelines import BASELINE, default_names, expand


def test_baseline_first_and_bits_inner():
    got = expand(["naive4", "nsep-pchan4"], [4, 3])
    assert list(got) == [BASELINE, "naive4", "naive3", "nsep-pchan4", "nsep-pchan3"]
    assert got["naive3"].keys.bits == 3


def test_specs_and_dict_configs_are_rewritten_per_bit_width():
    got = expand(["group(32,token)>int4(asym)"], [2])
    ((label, cfg),) = [(k, v) for k, v in got.items() if k != BASELINE]
    assert cfg.keys.bits == 2 and "int2" in label


def test_names_without_bits_are_kept_as_given():
    assert list(expand(["kivi2", "fp16"], None)) == [BASELINE, "kivi2"]
    assert default_names([3]) == ["naive3", "nsep-pchan3", "kivi3", "quanto3", "quarot3"]


def test_unknown_pipeline_is_an_eval_error():
    with pytest.raises(EvalError, match="nosuch"):
        expand(["nosuch4x"], None)


def test_fixed_width_formats_run_once_under_their_name():
    got = expand(["q4_0", "q8_0-rot", "rot>q4_1", "naive4"], [4, 3])
    assert list(got) == [BASELINE, "q4_0", "q8_0-rot", "rot>q4_1", "naive4", "naive3"]
    assert got["q8_0-rot"].values.to_spec() == "rot(ggml,block=64)>q8_0"


def test_frontier_and_llama_cpp_presets_under_bits():
    got = expand(["turboquant4", "fp8", "q4_0"], [4, 3, 2])
    assert list(got) == [BASELINE, "turboquant4", "turboquant3", "turboquant2", "fp8", "q4_0"]
