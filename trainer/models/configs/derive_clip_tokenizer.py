"""Derive the CLIP ViT-L/14 tokenizer files (vocab.json, merges.txt) that Stable Diffusion 1.x uses.

Why this script: the tokenizer cannot be downloaded from a model hub here, but OpenAI CLIP's BPE table
`bpe_simple_vocab_16e6.txt.gz` ships inside PyPI packages, and the 49408-token vocabulary is a pure function
of it (as in CLIP's simple_tokenizer.py):

    merges = lines[1 : 49152 - 256 - 2 + 1]                  # 48894 merge pairs
    vocab  = bytes_to_unicode values                          # 256 byte symbols
           + [v + "</w>" for each of them]                    # 256 end-of-word byte symbols
           + ["".join(pair) for pair in merges]               # 48894 merged symbols
           + ["<|startoftext|>", "<|endoftext|>"]             # ids 49406, 49407

Usage (nothing else needs installing; open_clip is only unpacked, never installed):

    pip download --no-deps open_clip_torch -d /tmp/oc
    python trainer/models/configs/derive_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl \
        trainer/models/configs/sd15/tokenizer

The first argument may be the .gz itself or any wheel/zip that contains it. The derived files are committed;
run this only to check or regenerate them. "a photo of a cat" must give [49406, 320, 1125, 539, 320, 2368, 49407].
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open_clip_torch 3.3.0's copy
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table: printable bytes map to themselves.

    The order matters (it fixes the ids): the printable bytes first, then the others mapped to chr(256 + n).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def read_bpe_table(source: str | Path) -> bytes:
    """The gzipped BPE table, from the .gz itself or from a wheel/zip that contains it."""
    source = Path(source)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = [n for n in archive.namelist() if n.endswith(BPE_NAME)]
            if not names:
                raise SystemExit(f"{source} does not contain {BPE_NAME}")
            return archive.read(names[0])
    return source.read_bytes()


def derive(gz_bytes: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab (token -> id) and the merge pairs, exactly as CLIP's simple_tokenizer builds them."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise SystemExit(f"derived {len(tokens)} tokens, expected {VOCAB_SIZE}: is this CLIP's {BPE_NAME}?")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; these are shipped data
    os.replace(tmp, path)


def main(source: str, out_dir: str) -> None:
    gz_bytes = read_bpe_table(source)
    digest = hashlib.sha256(gz_bytes).hexdigest()
    if digest != BPE_SHA256:
        print(f"warning: {BPE_NAME} sha256 {digest} differs from the known {BPE_SHA256}", file=sys.stderr)
    vocab, merges = derive(gz_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Same header and layout as the hub's CLIP merges.txt, so transformers reads it unchanged.
    write_atomic(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_atomic(out / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
