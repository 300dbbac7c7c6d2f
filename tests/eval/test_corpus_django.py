"""The prose and code corpora from the pinned Django sdist: splits disjoint, fixed, complete."""

import hashlib
import io
import tarfile

import pytest

from kvq.eval import assets, corpus, corpus_django
from kvq.eval.errors import EvalError

FILES = {
    "docs/topics/http/views.txt": "Views take a request.",
    "docs/topics/db/models.txt": "A model is the source.",
    "docs/ref/settings.txt": "Settings reference.",
    "docs/intro/tutorial01.txt": "Let's learn by example.",
    "docs/releases/5.2.txt": "Release notes.",
    "docs/conf.py": "not prose",
    "django/db/models/query.py": "class QuerySet: pass\n",
    "django/db/__init__.py": "DEFAULT_DB_ALIAS = 'default'\n",
    "django/http/request.py": "class HttpRequest: pass\n",
    "django/conf/locale/fr/formats.py": "DATE_FORMAT = 'j F Y'\n",
    "django/contrib/admin/static/x.js": "var x;",
    "tests/test_x.py": "def test(): pass\n",
}


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tf:
        for rel, text in {**FILES, "../evil.txt": "x"}.items():
            info = tarfile.TarInfo(corpus_django.ROOT + rel)
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    a = assets.ASSETS["django"]
    monkeypatch.setitem(assets.ASSETS, "django", assets.Asset(
        "django", a.requirement, a.filename, hashlib.sha256(blob.getvalue()).hexdigest(), 1,
        a.licence, True))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / a.filename).write_bytes(blob.getvalue())
    return corpus_django.django_tree()


def _rel(tree, files):
    return [p.relative_to(tree).as_posix() for p in files]


def test_splits_are_fixed_disjoint_and_exclude_release_notes_and_locales(tree):
    assert _rel(tree, corpus_django.split_files("prose", "eval")) == [
        "docs/topics/db/models.txt", "docs/topics/http/views.txt"]
    assert _rel(tree, corpus_django.split_files("prose", "calib")) == [
        "docs/intro/tutorial01.txt", "docs/ref/settings.txt"]
    assert _rel(tree, corpus_django.split_files("code", "eval")) == [
        "django/db/__init__.py", "django/db/models/query.py"]
    assert _rel(tree, corpus_django.split_files("code", "calib")) == ["django/http/request.py"]
    assert not (tree / "tests").exists() and not (tree / "evil.txt").exists()


def test_corpus_names_load_the_splits(tree):
    assert corpus.load_documents("prose") == ["A model is the source.", "Views take a request."]
    assert corpus.load_documents("prose:eval") == corpus.load_documents("prose")
    assert corpus.load_documents("code:calib") == ["class HttpRequest: pass\n"]
    assert corpus.is_eval_split("code") and corpus.is_eval_split("prose:eval")
    assert not corpus.is_eval_split("prose:calib") and not corpus.is_eval_split("my.txt")
    with pytest.raises(EvalError, match="unknown prose split 'test'"):
        corpus.load_documents("prose:test")


def test_real_splits_disjoint_and_large_enough():
    """The real sdist (when cached by kvq): disjoint splits of at least 400 kB each (> 100k
    tokens for either shipped tokenizer); skipped when the corpus is not cached."""
    root = assets.cache_dir() / "django"
    if not assets.verified(root):
        pytest.skip("the Django corpus is not in the kvq cache")
    for name in corpus_django.CORPORA:
        ev, ca = (corpus_django.split_files(name, s, root) for s in ("eval", "calib"))
        assert not set(ev) & set(ca)
        assert min(sum(p.stat().st_size for p in f) for f in (ev, ca)) > 400_000
