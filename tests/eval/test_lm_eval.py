"""The real ``lm_eval`` CLI, in a subprocess, offline, on a tiny model and kvq's shipped tasks.

``lm_eval --model kvq_hf`` works as typed because the package installs ``kvq-lm-eval.pth`` into
site-packages (see kvq/eval/lm_eval_hook.py). These tests fail if that file is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from kvq.eval import lm_eval_hook
from kvq.eval.tasks import TASKS_DIR

PTH = Path(lm_eval_hook.__file__).with_name("kvq-lm-eval.pth")


def _env(**extra):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(),
        cwd="/",
        timeout=120,
    )


def test_shipped_pth_file_is_the_hook_line():
    assert PTH.read_text() == lm_eval_hook.PTH_LINE


def test_pth_is_installed_and_start_up_stays_lean():
    site = Path(sysconfig.get_paths()["purelib"])
    assert (site / PTH.name).exists(), (
        f"{PTH.name} missing from {site}: reinstall kvq (pip install .)"
    )
    r = _python(
        "import sys; print('kvq' in sys.modules, 'torch' in sys.modules, 'lm_eval' in sys.modules)"
    )
    assert r.stdout.split() == ["False", "False", "False"], r.stderr


def test_registration_keeps_the_built_in_models():
    r = _python(
        "from lm_eval.api.registry import get_model; "
        "print(get_model('kvq_hf').__name__, get_model('hf').__name__)"
    )
    assert r.stdout.split() == ["KVQLM", "HFLM"], r.stderr


def test_lm_eval_cli_runs_kvq_hf_on_local_tasks(tiny_dir, text_file, tmp_path):
    lm_eval = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / "out"
    cmd = [
        str(lm_eval),
        "--model",
        "kvq_hf",
        "--model_args",
        f"pretrained={tiny_dir},kv=nsep>pchan>int4,values=ptok>int8",
        "--tasks",
        "kvq_shakespeare,kvq_needle,kvq_ruler",
        "--include_path",
        str(TASKS_DIR),
        "--metadata",
        json.dumps({"corpus": str(text_file), "max_chars": 1500, "lengths": [64], "per_length": 2}),
        "--output_path",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    cfg = results["config"]
    assert cfg["model"] == "kvq_hf"
    assert cfg["kvq_config"] == {"keys": "nsep>pchan>int4", "values": "ptok>int8"}
    assert 4 < cfg["kvq_bits_per_element"] < 16 and cfg["kvq_cache"]["prefill"] == "quantized"
    assert results["results"]["kvq_shakespeare"]["byte_perplexity,none"] > 1
    assert 0 <= results["results"]["kvq_needle"]["exact_match,number"] <= 1
    for sub in ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"):
        assert 0 <= results["results"][f"kvq_ruler_{sub}"]["score,none"] <= 1
