"""lm-eval tasks shipped with kvq, all offline.

Use them with ``lm_eval --include_path "$(python -m kvq.eval.tasks)" --tasks kvq_shakespeare``.

* ``kvq_shakespeare``: rolling perplexity (word/byte perplexity, bits per byte) over the
  held-out Shakespeare split, or any local corpus via ``--metadata '{"corpus": "my.txt"}'``.
* ``kvq_needle``: needle-in-a-haystack, haystacks of several lengths, exact match of the number.

The datasets are built by :mod:`kvq.eval.tasks.data` (``custom_dataset`` in the YAML files).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent

__all__ = ["TASKS_DIR"]
