"""Per-token scores of a run against the unquantized run: NLL, KL divergence, top-1 agreement.

llama.cpp's ``--kl-divergence`` way of judging KV types: for each scored position, the KL
divergence KL(P_ref || P_q) of the quantized run's next-token distribution P_q from the
reference (unquantized) run's P_ref, and whether both put the same token first.

Memory: a [tokens x vocab] fp32 logit matrix of a 2048-token window is 2 GB for a 262k vocab
(Gemma 3). So protocols keep each run's final hidden states (T, hidden) only, and
:func:`token_stats` projects them through the LM head a chunk of positions at a time, keeping
per-token scalars. :class:`Head` takes the final hidden states from the model's decoder and
applies its LM head (and final logit soft-capping, as Gemma 2/3 define it); for a model without
``get_decoder()`` it falls back to full logits (then ``hidden`` *are* the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq.hf.compat import cache_kwargs

CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MB in fp32, whatever the vocabulary


@dataclass
class TokenStats:
    """Per scored position (T,): ``nll`` (nats), ``kl`` (nats; None without a reference),
    ``top1`` (1.0 where the arg-max token equals the reference's; None without one)."""

    nll: torch.Tensor
    kl: torch.Tensor | None = None
    top1: torch.Tensor | None = None


class Head:
    """``forward(ids, cache)`` -> final hidden states (T, d); ``logits(h)`` -> (T, vocab) fp32."""

    def __init__(self, model):
        self.model = model
        decoder = getattr(model, "get_decoder", None)
        self.decoder = decoder() if callable(decoder) else None
        self.lm_head = model.get_output_embeddings() if self.decoder is not None else None
        if self.decoder is None or self.lm_head is None or self.decoder is model:
            self.decoder = self.lm_head = None
        text = model.config.get_text_config(decoder=True)
        self.softcap = getattr(text, "final_logit_softcapping", None)

    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Hidden states (T, d) of ``ids`` (1-D) run on top of ``cache`` (logits without a
        decoder to call)."""
        with torch.no_grad():
            if self.decoder is None:
                return self.model(ids[None], use_cache=True, **cache_kwargs(self.model, cache)
                                  ).logits[0]
            out = self.decoder(input_ids=ids[None], use_cache=True,
                               **cache_kwargs(self.decoder, cache))
            return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.lm_head is None:
                return hidden.float()
            out = self.lm_head(hidden).float()
            if self.softcap is not None:
                out = torch.tanh(out / self.softcap) * self.softcap
            return out


def token_stats(head: Head, hidden: torch.Tensor, targets: torch.Tensor,
                reference: torch.Tensor | None = None) -> TokenStats:
    """Scores of positions ``hidden`` (T, d) predicting ``targets`` (T,), against the
    reference run's hidden states ``reference`` (T, d) when given."""
    if reference is not None and reference.shape != hidden.shape:
        raise ValueError(f"reference hidden states {tuple(reference.shape)} do not match "
                         f"{tuple(hidden.shape)}")
    vocab = head.logits(hidden[:1]).shape[-1]
    step = max(1, CHUNK_ELEMENTS // vocab)
    nll, kl, top1 = [], [], []
    for s in range(0, hidden.shape[0], step):
        logq = torch.log_softmax(head.logits(hidden[s:s + step]), dim=-1)
        t = targets[s:s + step]
        nll.append(-logq.gather(-1, t[:, None])[:, 0])
        if reference is not None:
            logp = torch.log_softmax(head.logits(reference[s:s + step]), dim=-1)
            k, m = kl_top1(logp, logq)
            kl.append(k)
            top1.append(m)
    if reference is None:
        return TokenStats(torch.cat(nll))
    return TokenStats(torch.cat(nll), torch.cat(kl), torch.cat(top1))


def kl_top1(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) per row (nats, clamped at 0 against rounding) and top-1 agreement (1.0/0.0)
    for log-probabilities ``logp`` (reference) and ``logq`` of shape (T, vocab)."""
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - logq), 0.0).sum(dim=-1).clamp_min(0.0)
    return kl, (logp.argmax(dim=-1) == logq.argmax(dim=-1)).float()
