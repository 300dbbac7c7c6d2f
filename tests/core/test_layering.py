"""The dependency direction of docs/architecture.md: the core never imports hf, eval or cli."""

import re
from pathlib import Path

import kvq

ROOT = Path(kvq.__file__).parent
UPPER = ("hf", "eval", "export", "cli")
IMPORT = re.compile(r"^\s*(?:from|import)\s+kvq\.(" + "|".join(UPPER) + r")\b", re.M)


def test_core_modules_import_no_upper_layer():
    core = [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in UPPER]
    assert len(core) > 20
    bad = [f"{p.relative_to(ROOT)}: kvq.{m.group(1)}"
           for p in core for m in IMPORT.finditer(p.read_text())]
    assert not bad, bad


def test_hf_imports_no_eval_or_cli():
    bad = [f"{p.relative_to(ROOT)}: kvq.{m.group(1)}" for p in (ROOT / "hf").rglob("*.py")
           for m in IMPORT.finditer(p.read_text()) if m.group(1) != "hf"]
    assert not bad, bad
