"""KL divergence, top-1 agreement and the paired block bootstrap, on inputs with known answers."""

import math

import pytest
import torch

from kvq.eval import bootstrap, metrics


class _Identity(metrics.Head):
    """A head whose hidden states are the logits (the fallback path)."""

    def __init__(self):
        self.decoder = self.lm_head = None
        self.softcap = None


def test_kl_and_top1_closed_form():
    logp = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    logq = torch.log(torch.tensor([[0.5, 0.5], [0.6, 0.4]]))
    kl, top1 = metrics.kl_top1(logp, logq)
    want = [0.25 * math.log(0.5) + 0.75 * math.log(1.5),
            0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)]
    assert kl.tolist() == pytest.approx(want, rel=1e-6)
    assert top1.tolist() == [0.0, 1.0]  # the tie in row 0 resolves to token 0 != 1


def test_kl_of_a_distribution_with_itself_is_zero_even_with_zero_probabilities():
    logp = torch.log_softmax(torch.tensor([[0.0, -float("inf"), 2.0]]), dim=-1)
    kl, top1 = metrics.kl_top1(logp, logp)
    assert kl.item() == 0.0 and top1.item() == 1.0


@pytest.mark.parametrize("chunk", [1 << 25, 7 * 50])  # one chunk; chunks of 7 positions
def test_token_stats_chunked_equal_the_whole_computation(monkeypatch, chunk):
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    ref, q = torch.randn(33, 50, generator=g), torch.randn(33, 50, generator=g)
    targets = torch.randint(50, (33,), generator=g)
    s = metrics.token_stats(_Identity(), q, targets, ref)
    ce = torch.nn.functional.cross_entropy(q, targets, reduction="none")
    kl = torch.nn.functional.kl_div(torch.log_softmax(q, -1), torch.log_softmax(ref, -1),
                                    log_target=True, reduction="none").sum(-1)
    assert torch.allclose(s.nll, ce, atol=1e-5) and torch.allclose(s.kl, kl, atol=1e-5)
    assert torch.equal(s.top1, (q.argmax(-1) == ref.argmax(-1)).float())


def test_head_reproduces_the_model_logits_llama(tiny):
    _check_head(tiny[0])


def test_head_reproduces_the_model_logits_gemma3_with_softcapping():
    import transformers as tf

    cfg = tf.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, sliding_window=8, final_logit_softcapping=3.0,
                              layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    _check_head(tf.Gemma3ForCausalLM(cfg).eval())


def _check_head(model):
    from transformers import DynamicCache

    ids = torch.arange(3, 23) % model.config.vocab_size
    head = metrics.Head(model)
    assert head.decoder is not None
    hidden = head.forward(ids, DynamicCache(config=model.config))
    with torch.no_grad():
        want = model(ids[None]).logits[0]
    assert torch.allclose(head.logits(hidden), want, atol=1e-5)


def test_block_ids_never_cross_windows():
    assert bootstrap.block_ids([5, 3], block=2).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]


def test_bootstrap_identical_runs_give_a_zero_interval():
    nll = torch.rand(512, generator=torch.Generator().manual_seed(1)) * 5
    ci = bootstrap.paired(nll, nll, torch.full((512,), 0.02), bootstrap.block_ids([512], 16))
    assert (ci["delta_ppl"].low, ci["delta_ppl"].high) == (0.0, 0.0)
    assert ci["kl"].low == pytest.approx(0.02) and ci["kl"].high == pytest.approx(0.02)


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory_width():
    """400 independent blocks of N(0.1, 0.05²) KL: the 95% interval is mean ± 1.96·σ/√n."""
    g = torch.Generator().manual_seed(2)
    kl = 0.1 + 0.05 * torch.randn(400, generator=g, dtype=torch.float64)
    ci = bootstrap.paired(torch.zeros(400), torch.zeros(400), kl, bootstrap.block_ids([400], 1),
                          resamples=4000)
    half = 1.96 * float(kl.std()) / math.sqrt(400)
    assert ci["kl"].low == pytest.approx(float(kl.mean()) - half, abs=0.15 * half)
    assert ci["kl"].high == pytest.approx(float(kl.mean()) + half, abs=0.15 * half)


def test_bootstrap_is_paired_and_deterministic():
    """A constant per-token NLL shift of 0.01 on very uneven text: pairing removes the text's
    spread (which alone moves the PPL by about ±20%), so the ΔPPL interval holds the true
    difference, excludes 0 and is narrow; the same seed repeats."""
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(64, generator=g).repeat_interleave(32) * 4  # blocks of very different nll
    q, blocks = ref + 0.01, bootstrap.block_ids([2048], 32)
    ci = bootstrap.paired(q, ref, None, blocks)
    true = math.exp(float(q.mean())) - math.exp(float(ref.mean()))
    assert ci["delta_ppl"].low <= true <= ci["delta_ppl"].high
    assert ci["delta_ppl"].low > 0 and ci["kl"] is None
    assert ci["delta_ppl"].high - ci["delta_ppl"].low < 0.01 * math.exp(float(ref.mean()))
    assert bootstrap.paired(q, ref, None, blocks) == ci
