"""Evaluation: how much a K/V pipeline costs in quality and saves in memory.

- :mod:`kvq.eval.compare` (``kvq compare``): several pipelines on one model, side by side, under
  the protocols of :mod:`kvq.eval.protocols`, reported by :mod:`kvq.eval.report` and
  :mod:`kvq.eval.plot`.
- :mod:`kvq.eval.lm_eval_model`: the ``kvq_hf`` model of lm-evaluation-harness (registered by
  :mod:`kvq.eval.lm_eval_hook`), with offline tasks in :mod:`kvq.eval.tasks`.
- :mod:`kvq.eval.assets`, :mod:`kvq.eval.models`, :mod:`kvq.eval.corpus`: the embedded default
  model (SmolLM2-135M-Instruct) and corpus (Shakespeare, fixed held-out split).

Importing this package imports nothing heavy; each module loads torch/transformers when used.
"""
