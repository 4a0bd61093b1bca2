"""CLIP tokenizer (packaged vocabulary), fixed-length tokenization and phrase-token lookup.

The package ships OpenAI CLIP's byte-pair vocabulary as ``rl4pix_jax/assets/clip_tokenizer/``
(``vocab.json`` + ``merges.txt``, MIT licensed, see the ``LICENSE`` there; rebuilt by
``tools/make_clip_tokenizer_assets.py``), so tokenization works offline without a model
download. Stable Diffusion 1.x / InstructPix2Pix use exactly this vocabulary.

Token ids follow the diffusers Stable Diffusion pipelines: ``<|startoftext|>`` (49406) at
position 0, the text's tokens, ``<|endoftext|>`` (49407), then the tokenizer's pad token up to
``max_length`` (77); longer texts are truncated, keeping the end token last.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

CLIP_MAX_LENGTH = 77
_ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "clip_tokenizer")
_VOCAB_FILE = "vocab.json"
_MERGES_FILE = "merges.txt"
_HUGE_MAX_LENGTH = 10**6  # transformers' "no limit" sentinel is ~1e30.


def packaged_tokenizer_dir() -> str:
  """Returns the folder of the packaged CLIP vocabulary (vocab.json, merges.txt, LICENSE)."""
  return _ASSETS_DIR


def _tokenizer_folder(folder: str) -> str:
  """Resolves a tokenizer folder: itself, or ``<folder>/tokenizer`` for a pipeline root."""
  if not os.path.isdir(folder):
    raise ValueError(f"Tokenizer folder {folder!r} does not exist: expected a diffusers "
                     "pipeline (with tokenizer/), its tokenizer/ folder or a CLIP model folder.")
  has_files = any(os.path.isfile(os.path.join(folder, name))
                  for name in (_VOCAB_FILE, "tokenizer.json"))
  pipeline_tokenizer = os.path.join(folder, "tokenizer")
  if not has_files and os.path.isdir(pipeline_tokenizer):
    return pipeline_tokenizer
  if not has_files:
    raise ValueError(f"{folder!r} holds no CLIP tokenizer: expected vocab.json + merges.txt "
                     f"or tokenizer.json (found: {sorted(os.listdir(folder))}).")
  return folder


def load_clip_tokenizer(folder: Optional[str] = None, max_length: int = CLIP_MAX_LENGTH):
  """Loads a transformers ``CLIPTokenizer``.

  Args:
    folder: None for the packaged OpenAI CLIP vocabulary; otherwise a diffusers pipeline
      folder, its ``tokenizer/`` folder, or a transformers CLIP model folder (read with
      ``CLIPTokenizer.from_pretrained``, so its pad token and settings are kept; SD 2.x pads
      with "!" = 0, SD 1.x with ``<|endoftext|>`` = 49407).
    max_length: ``model_max_length`` to set when the folder does not give a real one.
  Returns:
    A ``transformers.CLIPTokenizer``; its ``model_max_length`` is ``max_length`` unless the
    folder's tokenizer_config.json sets one.
  """
  from transformers import CLIPTokenizer  # local import: transformers is slow to import

  if folder is None:
    vocab = os.path.join(_ASSETS_DIR, _VOCAB_FILE)
    merges = os.path.join(_ASSETS_DIR, _MERGES_FILE)
    for path in (vocab, merges):
      if not os.path.isfile(path):
        raise ValueError(f"Packaged CLIP vocabulary file {path!r} is missing: run "
                         "`python tools/make_clip_tokenizer_assets.py` from the repository root.")
    # transformers 5.x: the files must be passed positionally; as keyword arguments
    # (vocab_file=..., merges_file=...) they are silently ignored and the ids are wrong.
    return CLIPTokenizer(vocab, merges, model_max_length=max_length)
  tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_folder(folder))
  if tokenizer.model_max_length > _HUGE_MAX_LENGTH:
    tokenizer.model_max_length = max_length
  return tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_length: int = CLIP_MAX_LENGTH) -> np.ndarray:
  """Tokenizes texts as the diffusers Stable Diffusion pipelines do.

  Args:
    tokenizer: a ``CLIPTokenizer`` (see ``load_clip_tokenizer``).
    texts: B strings (a single string is rejected: wrap it in a list).
    max_length: L, the fixed sequence length (77 for CLIP text encoders).
  Returns:
    (B, L) int32 ids: start token, text tokens, end token, then the tokenizer's pad token;
    texts longer than L tokens are truncated with the end token kept at position L - 1.
  """
  if isinstance(texts, str):
    raise ValueError(f"tokenize expects a sequence of strings, got the single string {texts!r}.")
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"tokenize: texts[{i}] is {type(text).__name__}, expected str.")
  if max_length < 2:
    raise ValueError(f"tokenize: max_length={max_length} leaves no room for start/end tokens.")
  if not texts:
    return np.zeros((0, max_length), np.int32)
  encoded = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True)
  return np.asarray(encoded["input_ids"], dtype=np.int32)


QUOTE_LIMIT = 80  # characters of user text quoted in a message


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
  """``repr(text)``, shortened to its first ``limit`` characters with a count of the rest."""
  if len(text) <= limit:
    return repr(text)
  return f"{text[:limit]!r}... ({len(text)} characters)"


def truncation(tokenizer, text: str, max_length: int = CLIP_MAX_LENGTH):
  """None when ``text`` fits ``max_length`` tokens (with start and end), else
  (its token count, the last words kept): ``tokenize`` cuts what follows them."""
  ids = _text_ids_untruncated(tokenizer, text)[1:]
  room = max_length - 2
  if len(ids) <= room:
    return None
  kept = tokenizer.decode(ids[max(0, room - 8):room]).strip()
  return len(ids) + 2, kept


def _phrase_ids(tokenizer, phrase: str) -> list:
  return list(tokenizer(phrase, add_special_tokens=False)["input_ids"])


def _text_ids_untruncated(tokenizer, text: str) -> list:
  """Start token + all text tokens (no truncation; the end token is not needed here)."""
  ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
  return [tokenizer.bos_token_id] + list(ids)


def _first_occurrence(haystack: Sequence[int], needle: Sequence[int]) -> int:
  n = len(needle)
  for start in range(len(haystack) - n + 1):
    if list(haystack[start:start + n]) == list(needle):
      return start
  return -1


def find_token_positions(
    tokenizer,
    text: str,
    phrase: str,
    max_tokens: int,
    max_length: int = CLIP_MAX_LENGTH,
) -> Tuple[np.ndarray, np.ndarray]:
  """Positions of a phrase's tokens inside the tokenized text.

  Positions index the ids that ``tokenize(tokenizer, [text], max_length)`` produces (start
  token at 0), so they select the phrase's columns of the UNet's cross-attention maps. The
  match is on whole tokens and case-insensitive (CLIP lower-cases); a phrase of several words
  must appear as the same token sequence; when it occurs several times, the first occurrence
  is used.

  Args:
    tokenizer: a ``CLIPTokenizer``.
    text: the prompt/instruction, e.g. "put a red hat on the dog".
    phrase: the target object, e.g. "red hat".
    max_tokens: K, the padded length of the result.
    max_length: the tokenization length L (77).
  Returns:
    index: (K,) int32 token positions in [1, L - 2], padded with 0.
    mask: (K,) bool, True for the phrase's tokens, False for padding.
  Raises:
    ValueError (naming text and phrase): empty phrase, phrase with more than K tokens,
    phrase not in the text, or phrase past the truncation length.
  """
  if not isinstance(phrase, str) or not isinstance(text, str):
    raise ValueError(f"find_token_positions expects strings, got text={quote(text)}, "
                     f"phrase={quote(phrase)}.")
  if max_tokens < 1:
    raise ValueError(f"find_token_positions: max_tokens={max_tokens} must be >= 1.")
  phrase_ids = _phrase_ids(tokenizer, phrase)
  if not phrase_ids:
    raise ValueError(f"Empty phrase {quote(phrase)} for text {quote(text)}: expected at least one token.")
  if len(phrase_ids) > max_tokens:
    raise ValueError(f"Phrase {quote(phrase)} (in text {quote(text)}) has {len(phrase_ids)} tokens, more "
                     f"than max_tokens={max_tokens}.")
  text_ids = _text_ids_untruncated(tokenizer, text)
  start = _first_occurrence(text_ids, phrase_ids)
  if start < 0:
    raise ValueError(f"Phrase {quote(phrase)} does not occur in text {quote(text)} (as whole tokens).")
  last_content_position = max_length - 2  # position max_length - 1 holds the end token
  if start + len(phrase_ids) - 1 > last_content_position:
    raise ValueError(f"Phrase {quote(phrase)} lies beyond the truncation length {max_length} of "
                     f"text {quote(text)} (its tokens start at position {start}).")
  index = np.zeros((max_tokens,), np.int32)
  mask = np.zeros((max_tokens,), bool)
  index[:len(phrase_ids)] = np.arange(start, start + len(phrase_ids), dtype=np.int32)
  mask[:len(phrase_ids)] = True
  return index, mask


def find_token_positions_batch(
    tokenizer,
    texts: Sequence[str],
    phrases: Sequence[str],
    max_tokens: int,
    max_length: int = CLIP_MAX_LENGTH,
) -> Tuple[np.ndarray, np.ndarray]:
  """``find_token_positions`` for B (text, phrase) pairs.

  Returns:
    index: (B, K) int32 positions, padded with 0; mask: (B, K) bool.
  Raises:
    ValueError: lengths differ, or any pair fails (the message names the batch element).
  """
  texts, phrases = list(texts), list(phrases)
  if len(texts) != len(phrases):
    raise ValueError(f"find_token_positions_batch: {len(texts)} texts but {len(phrases)} "
                     "phrases; expected one phrase per text.")
  index = np.zeros((len(texts), max_tokens), np.int32)
  mask = np.zeros((len(texts), max_tokens), bool)
  for i, (text, phrase) in enumerate(zip(texts, phrases)):
    try:
      index[i], mask[i] = find_token_positions(tokenizer, text, phrase, max_tokens, max_length)
    except ValueError as e:
      raise ValueError(f"Batch element {i}: {e}") from e
  return index, mask
