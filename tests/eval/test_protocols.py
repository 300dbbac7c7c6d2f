import math

import pytest
import torch

import kvq
from kvq.eval.errors import EvalError
from kvq.eval.protocols import PROTOCOLS, get_protocol


@pytest.fixture(scope="module")
def windows(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (2, 48), generator=g)


def plain_nll(model, windows, first_scored: int) -> float:
    """Summed NLL of tokens first_scored.. of each window, with no cache at all."""
    with torch.no_grad():
        logits = model(windows).logits
    lp = torch.log_softmax(logits[:, first_scored - 1 : -1].float(), -1)
    return -lp.gather(-1, windows[:, first_scored:, None]).sum().item()


CONFIGS = {"fp16": kvq.kv("fp16"), "naive2": kvq.kv("naive2")}


@pytest.mark.parametrize(
    "name,first", [("teacher-forced", 1), ("seed", 48 - 8), ("streaming", 48 - 8)]
)
def test_fp16_reference_equals_the_model_without_cache(tiny, windows, name, first):
    model, _ = tiny
    proto = get_protocol(name, continuation=8, steps=8, block=8, residual=8)
    scores = proto.run(model, windows, CONFIGS)
    ref = plain_nll(model, windows, first)
    assert scores["fp16"].tokens == windows.shape[0] * (48 - first)
    assert math.isclose(scores["fp16"].nll, ref, rel_tol=1e-4)
    # a 2-bit cache changes the scores and holds fewer bytes than fp16
    assert abs(scores["naive2"].nll - ref) > 1e-3
    assert 0 < scores["naive2"].cache_bytes < scores["naive2"].fp16_bytes


def test_ticks_once_per_window_and_config(tiny, windows):
    ticks = []
    get_protocol("teacher-forced").run(tiny[0], windows, CONFIGS, tick=lambda: ticks.append(1))
    assert len(ticks) == 2 * len(CONFIGS)


def test_unknown_protocol_and_too_short_context():
    with pytest.raises(EvalError, match="did you mean 'seed'"):
        get_protocol("sed")
    with pytest.raises(EvalError, match="at least"):
        get_protocol("seed", continuation=32).check(16)
    assert set(PROTOCOLS) == {"teacher-forced", "seed", "streaming"}
