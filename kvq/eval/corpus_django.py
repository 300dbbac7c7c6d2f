"""The ``prose`` and ``code`` corpora: Django 5.2.8's documentation sources and Python sources.

Both come from the pinned sdist ``django==5.2.8`` (BSD-3-Clause; see :mod:`kvq.eval.assets`),
read as a tar file (never built or installed). Fixed held-out splits, by directory so that an
eval file and a calibration file never share a topic page or a module:

* ``prose`` (eval): ``docs/topics/**/*.txt``, Django's topic guides (reStructuredText,
  modern technical English), sorted by path.
* ``prose:calib``: every other ``docs/**/*.txt`` except ``docs/releases/`` (reference, how-to,
  tutorial, internals, FAQ).
* ``code`` (eval): ``django/db/**/*.py`` (the ORM), sorted by path.
* ``code:calib``: every other ``django/**/*.py`` except ``django/conf/locale/`` (locale tables).

Each split holds well over 100k tokens for SmolLM2's and Gemma 3's tokenizers (docs/evaluation.md).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from kvq.eval import assets
from kvq.eval.errors import EvalError

ROOT = "django-5.2.8/"
CORPORA = ("prose", "code")
_RULES = {  # corpus -> (suffix, folder the corpus lives in, folder of its eval split, excluded)
    "prose": (".txt", "docs/", "docs/topics/", ("docs/releases/",)),
    "code": (".py", "django/", "django/db/", ("django/conf/locale/",)),
}


def django_tree() -> Path:
    """Folder holding the sdist's ``docs/**/*.txt`` and ``django/**/*.py`` (unpacked once)."""
    out = assets.clean_staging() / "django"  # staging of killed runs goes first
    if assets.verified(out):
        return out
    assets.claim(out)  # a folder kvq did not write is never replaced
    archive = assets.fetch("django")
    with tarfile.open(archive) as tf, assets._staging(out.parent) as tmp:
        for member in tf.getmembers():
            rel = member.name[len(ROOT):] if member.name.startswith(ROOT) else ""
            if member.isfile() and any(
                rel.startswith(folder) and rel.endswith(suffix)
                for suffix, folder, _, _ in _RULES.values()
            ):
                member.name = rel
                tf.extract(member, tmp / "tree", filter="data")
        if not (tmp / "tree").is_dir():
            raise EvalError(f"{archive.name} holds no docs or sources under {ROOT}")
        assets.write_manifest(tmp / "tree")
        assets._swap(tmp / "tree", out)
    return out


def split_files(corpus: str, split: str = "eval", root: Path | None = None) -> list[Path]:
    """Files of ``corpus`` (``prose`` or ``code``) in split ``eval`` or ``calib``, sorted."""
    if corpus not in _RULES:
        raise EvalError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    if split not in ("eval", "calib"):
        raise EvalError(f"unknown {corpus} split {split!r}; use 'eval' or 'calib'")
    suffix, folder, held_out, excluded = _RULES[corpus]
    root = root or django_tree()
    out = []
    for path in sorted((root / folder).rglob(f"*{suffix}")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(excluded):
            if rel.startswith(held_out) == (split == "eval"):
                out.append(path)
    return out
