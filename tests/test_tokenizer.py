"""Tests for rl4pix_jax.tokenizer: packaged vocabulary, tokenize, phrase-token lookup."""

import json
import os
import shutil

import numpy as np
import pytest

from rl4pix_jax import tokenizer as tk

# Stable Diffusion 1.x's tokenizer/tokenizer_config.json (openai/clip-vit-large-patch14), as
# written by transformers 4.x: the legacy layout that pipeline folders on the hub still have.
_SD1_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False,
                  "normalized": True, "rstrip": False, "single_word": False},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False,
                  "normalized": True, "rstrip": False, "single_word": False},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False,
                  "normalized": True, "rstrip": False, "single_word": False},
}
_SD1_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                       "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


@pytest.fixture(scope="module")
def tokenizer():
  return tk.load_clip_tokenizer()


def _write_legacy_folder(folder, pad_token="<|endoftext|>"):
  os.makedirs(folder)
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(tk.packaged_tokenizer_dir(), name), folder)
  config = dict(_SD1_TOKENIZER_CONFIG, pad_token=pad_token)
  special = dict(_SD1_SPECIAL_TOKENS, pad_token=pad_token)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special, f)


def test_packaged_assets_and_license():
  folder = tk.packaged_tokenizer_dir()
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  assert len(vocab) == 49408
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("#version") and len(lines) == 1 + 48894
  with open(os.path.join(folder, "LICENSE"), encoding="utf-8") as f:
    assert "Copyright (c) 2021 OpenAI" in f.read()


def test_reference_ids(tokenizer):
  assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert tokenizer.model_max_length == 77
  assert tokenizer.pad_token_id == 49407


def test_tokenize_matches_padding_max_length(tokenizer):
  texts = ["a photo of a cat", "", "Turn the SKY into a sunset, please!", "word " * 120]
  ids = tk.tokenize(tokenizer, texts)
  expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  assert ids.dtype == np.int32 and ids.shape == (4, 77)
  np.testing.assert_array_equal(ids, np.asarray(expected))
  np.testing.assert_array_equal(ids[1, :3], [49406, 49407, 49407])
  assert ids[3, 0] == 49406 and ids[3, -1] == 49407  # truncated, end token kept
  assert tk.tokenize(tokenizer, ["a cat"], max_length=8).shape == (1, 8)
  assert tk.tokenize(tokenizer, []).shape == (0, 77)


def test_tokenize_rejects_bad_input(tokenizer):
  with pytest.raises(ValueError, match="single string"):
    tk.tokenize(tokenizer, "a cat")
  with pytest.raises(ValueError, match=r"texts\[1\]"):
    tk.tokenize(tokenizer, ["a cat", 3])
  with pytest.raises(ValueError, match="max_length"):
    tk.tokenize(tokenizer, ["a cat"], max_length=1)


def test_load_from_pipeline_folders(tmp_path, tokenizer):
  sd1 = tmp_path / "sd1" / "tokenizer"
  _write_legacy_folder(str(sd1))
  sd2 = tmp_path / "sd2" / "tokenizer"
  _write_legacy_folder(str(sd2), pad_token="!")
  saved = tmp_path / "saved"
  tokenizer.save_pretrained(str(saved))
  texts = ["a photo of a cat", "Make the dog wear a hat"]
  expected = tk.tokenize(tokenizer, texts)
  for folder in (sd1, tmp_path / "sd1", saved):
    loaded = tk.load_clip_tokenizer(str(folder))
    assert loaded.model_max_length == 77
    np.testing.assert_array_equal(tk.tokenize(loaded, texts), expected)
  sd2_ids = tk.tokenize(tk.load_clip_tokenizer(str(sd2)), texts)
  np.testing.assert_array_equal(sd2_ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 0])


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tk.load_clip_tokenizer(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no CLIP tokenizer"):
    tk.load_clip_tokenizer(str(tmp_path / "empty"))


def _tokens_at(tokenizer, text, index, mask):
  ids = tk.tokenize(tokenizer, [text])[0]
  return tokenizer.convert_ids_to_tokens([int(i) for i in ids[index[mask]]])


def test_find_single_word(tokenizer):
  text = "put a hat on the dog"
  index, mask = tk.find_token_positions(tokenizer, text, "dog", max_tokens=3)
  assert index.dtype == np.int32 and mask.dtype == bool and index.shape == (3,)
  np.testing.assert_array_equal(index, [6, 0, 0])
  np.testing.assert_array_equal(mask, [True, False, False])
  assert _tokens_at(tokenizer, text, index, mask) == ["dog</w>"]


def test_find_multi_word_case_and_repeats(tokenizer):
  text = "Put a RED hat on the Red Dog and the red dog"
  index, mask = tk.find_token_positions(tokenizer, text, "red dog", max_tokens=4)
  np.testing.assert_array_equal(index, [7, 8, 0, 0])  # first full occurrence, not "RED hat"
  np.testing.assert_array_equal(mask, [True, True, False, False])
  assert _tokens_at(tokenizer, text, index, mask) == ["red</w>", "dog</w>"]
  index, _ = tk.find_token_positions(tokenizer, "a cat and a cat", "CAT", max_tokens=1)
  np.testing.assert_array_equal(index, [2])
  # A word split into several BPE tokens: every one of its tokens is returned.
  text = "replace the hippopotamus with a zebra"
  index, mask = tk.find_token_positions(tokenizer, text, "hippopotamus", max_tokens=6)
  pieces = tokenizer.tokenize("hippopotamus")
  assert mask.sum() == len(pieces) and _tokens_at(tokenizer, text, index, mask) == pieces


def test_find_errors_name_both_strings(tokenizer):
  cases = [
      ("a cat on a mat", "dog", 2, "does not occur"),
      ("a cat on a mat", "cats", 2, "does not occur"),  # whole tokens only
      ("a cat on a mat", "  ", 2, "Empty phrase"),
      ("a cat on a mat", "cat on a mat", 2, "more than max_tokens=2"),
      ("word " * 80 + "cat", "cat", 2, "beyond the truncation length"),
  ]
  for text, phrase, max_tokens, message in cases:
    with pytest.raises(ValueError, match=message) as info:
      tk.find_token_positions(tokenizer, text, phrase, max_tokens)
    # Both strings are named; user text is quoted up to tk.QUOTE_LIMIT characters.
    assert repr(phrase) in str(info.value) and tk.quote(text) in str(info.value)
  # The last position before the end token is still inside; one further is not.
  text = "word " * 74 + "cat"
  index, _ = tk.find_token_positions(tokenizer, text, "cat", 1)
  assert index[0] == 75
  with pytest.raises(ValueError, match="beyond"):
    tk.find_token_positions(tokenizer, "word " + text, "cat", 1)


def test_quote_shortens_long_user_text():
  assert tk.quote("a cat") == "'a cat'"
  long = "word " * 80
  assert tk.quote(long) == f"{long[:tk.QUOTE_LIMIT]!r}... (400 characters)"


def test_find_batch(tokenizer):
  texts = ["put a hat on the dog", "Put a RED hat on the Red Dog"]
  index, mask = tk.find_token_positions_batch(tokenizer, texts, ["dog", "red dog"], 3)
  assert index.shape == (2, 3) and mask.shape == (2, 3)
  np.testing.assert_array_equal(index, [[6, 0, 0], [7, 8, 0]])
  np.testing.assert_array_equal(mask, [[True, False, False], [True, True, False]])
  with pytest.raises(ValueError, match="one phrase per text"):
    tk.find_token_positions_batch(tokenizer, texts, ["dog"], 3)
  with pytest.raises(ValueError, match="Batch element 1"):
    tk.find_token_positions_batch(tokenizer, texts, ["dog", "cat"], 3)


@pytest.fixture(scope="module")
def assets_tool():
  """tools/make_clip_tokenizer_assets.py imported as a module (tools/ is not a package)."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools",
                      "make_clip_tokenizer_assets.py")
  spec = importlib.util.spec_from_file_location("make_clip_tokenizer_assets", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_assets_tool_byte_symbols(assets_tool):
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  reference = bytes_to_unicode()  # {byte: char}, printable bytes first
  assert assets_tool.byte_symbols() == list(reference.values())
  assert len(set(assets_tool.byte_symbols())) == 256


def test_assets_tool_rebuilds_packaged_vocab(assets_tool, tmp_path):
  import gzip
  folder = tk.packaged_tokenizer_dir()
  with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
    merge_lines = f.read().splitlines()[1:]
  # Rebuild from a .gz laid out like OpenAI's file (a header line, then extra merges that
  # CLIP drops) and compare with the shipped files byte for byte.
  bpe = tmp_path / "bpe.txt.gz"
  with gzip.open(bpe, "wt", encoding="utf-8") as f:
    f.write("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2"] + merge_lines + ["x y", "z w"]))
  out = tmp_path / "out"
  assets_tool.write_assets(str(bpe), str(out))
  for name in ("vocab.json", "merges.txt", "LICENSE"):
    with open(out / name, "rb") as rebuilt, open(os.path.join(folder, name), "rb") as shipped:
      assert rebuilt.read() == shipped.read(), name
  with gzip.open(bpe, "wt", encoding="utf-8") as f:
    f.write("header\n" + "\n".join(merge_lines[:10]))
  with pytest.raises(ValueError, match="expected 48894"):
    assets_tool.read_merges(str(bpe))
  with gzip.open(bpe, "wt", encoding="utf-8") as f:
    f.write("header\n" + "\n".join(merge_lines[:5] + ["bad"] + merge_lines[6:]))
  with pytest.raises(ValueError, match="line 7"):
    assets_tool.read_merges(str(bpe))
  with pytest.raises(ValueError, match="49408"):
    assets_tool.build_vocab([("a", "b")] * 48894)


def test_assets_tool_extracts_from_wheel(assets_tool, tmp_path):
  import zipfile
  wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(assets_tool.BPE_MEMBER, b"payload")
  path = assets_tool.extract_bpe_from_wheel(str(wheel), str(tmp_path / "x"))
  with open(path, "rb") as f:
    assert f.read() == b"payload"
  other = tmp_path / "other.whl"
  with zipfile.ZipFile(other, "w") as z:
    z.writestr("something_else.txt", b"")
  with pytest.raises(ValueError, match="pass an open-clip-torch wheel"):
    assets_tool.extract_bpe_from_wheel(str(other), str(tmp_path / "y"))
