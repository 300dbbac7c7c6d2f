"""``python -m kvq.eval.tasks`` prints the directory to pass to ``lm_eval --include_path``."""

from kvq.eval.tasks import TASKS_DIR

print(TASKS_DIR)
