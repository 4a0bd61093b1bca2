"""Builds the packaged CLIP tokenizer files (HF ``vocab.json`` + ``merges.txt``).

OpenAI's CLIP byte-pair vocabulary ``bpe_simple_vocab_16e6.txt.gz`` (MIT licensed) ships inside
the open-clip-torch wheel on PyPI. This script converts it to the two files that transformers'
``CLIPTokenizer`` reads and writes them, with the vocabulary's license notice, into
``rl4pix_jax/assets/clip_tokenizer/``:

  * ``vocab.json``: 49,408 entries: the 256 byte symbols, the same 256 with the end-of-word
    marker ``</w>``, one token per merge (48,894 merges), then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407).
  * ``merges.txt``: ``#version: 0.2`` then the 48,894 merges, one ``left right`` pair a line.

Usage (from the repository root)::

  python tools/make_clip_tokenizer_assets.py                 # pip-downloads the wheel
  python tools/make_clip_tokenizer_assets.py --wheel /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
  python tools/make_clip_tokenizer_assets.py --bpe bpe_simple_vocab_16e6.txt.gz --out some/dir
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Tuple

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file.
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "rl4pix_jax", "assets", "clip_tokenizer")

OPENAI_CLIP_LICENSE = """\
The files vocab.json and merges.txt in this folder are a format conversion (made by
tools/make_clip_tokenizer_assets.py) of bpe_simple_vocab_16e6.txt.gz from OpenAI's CLIP
(https://github.com/openai/CLIP), as redistributed in the open-clip-torch 3.3.0 wheel.
They are covered by CLIP's license:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def byte_symbols() -> List[str]:
  """Returns the printable stand-in character of each byte, in CLIP's vocabulary order.

  Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand
  for themselves and come first, in byte order; every other byte (control characters, space,
  soft hyphen) gets the next code point from U+0100 upwards, and these follow in byte order.
  """
  printable = [b for b in range(256)
               if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
  printable_set = set(printable)
  others = [b for b in range(256) if b not in printable_set]
  symbols = [chr(b) for b in printable]
  symbols += [chr(256 + i) for i in range(len(others))]
  return symbols


def read_merges(bpe_gz_path: str) -> List[Tuple[str, str]]:
  """Reads the first ``NUM_MERGES`` merge pairs (after the header line) of the BPE file."""
  with gzip.open(bpe_gz_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  body = lines[1:1 + NUM_MERGES]
  if len(body) != NUM_MERGES:
    raise ValueError(f"{bpe_gz_path!r} has {len(body)} merge lines, expected {NUM_MERGES}.")
  merges = []
  for number, line in enumerate(body, start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{bpe_gz_path!r} line {number}: expected 'left right', got {line!r}.")
    merges.append((parts[0], parts[1]))
  return merges


def build_vocab(merges: List[Tuple[str, str]]) -> Dict[str, int]:
  """Token -> id: bytes, bytes + ``</w>``, one token per merge, start and end tokens."""
  symbols = byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
  tokens += [START_TOKEN, END_TOKEN]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE:
    raise ValueError(f"Built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}.")
  return vocab


def write_assets(bpe_gz_path: str, out_dir: str) -> None:
  """Writes vocab.json, merges.txt and LICENSE into ``out_dir``."""
  merges = read_merges(bpe_gz_path)
  vocab = build_vocab(merges)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.write("".join(f"{a} {b}\n" for a, b in merges))
  with open(os.path.join(out_dir, "LICENSE"), "w", encoding="utf-8") as f:
    f.write(OPENAI_CLIP_LICENSE)


def extract_bpe_from_wheel(wheel_path: str, work_dir: str) -> str:
  """Extracts the BPE vocabulary from an open-clip-torch wheel; returns its path."""
  with zipfile.ZipFile(wheel_path) as wheel:
    if BPE_MEMBER not in wheel.namelist():
      raise ValueError(f"{wheel_path!r} has no {BPE_MEMBER!r}: pass an open-clip-torch wheel.")
    return wheel.extract(BPE_MEMBER, work_dir)


def download_wheel(work_dir: str) -> str:
  """Downloads the open-clip-torch wheel (no dependencies) with pip; returns its path."""
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", OPEN_CLIP_WHEEL,
                  "-d", work_dir], check=True)
  wheels = glob.glob(os.path.join(work_dir, "open_clip_torch-*.whl"))
  if not wheels:
    raise RuntimeError(f"pip download of {OPEN_CLIP_WHEEL} left no wheel in {work_dir!r}.")
  return wheels[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--wheel", help="a downloaded open-clip-torch wheel")
  source.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz itself")
  parser.add_argument("--out", default=DEFAULT_OUT, help="output folder")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as work_dir:
    bpe_path = args.bpe
    if bpe_path is None:
      wheel = args.wheel or download_wheel(work_dir)
      bpe_path = extract_bpe_from_wheel(wheel, work_dir)
    write_assets(bpe_path, args.out)
  print(f"Wrote vocab.json, merges.txt and LICENSE to {args.out}")


if __name__ == "__main__":
  main()
