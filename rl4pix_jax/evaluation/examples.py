"""The examples of an evaluation: a split's records, decoded, in single- or multi-turn order.

Single-turn: examples are a split's first ``max_examples`` records in stored order, decoded at
one resolution.

Multi-turn (MagicBrush's "final turn" setting): records are grouped into sessions by image
(``example_id = "<img_id>-<turn>"``), ordered by image id (numerically when it is a number:
the split's stored order is a hash order); ``max_examples`` counts sessions, and each
session's turns must be exactly 1..K. Examples come session by session, turns ascending. Only
the final turn of each session is scored (as ``evaluation/image_eval.py`` of MagicBrush scores
``<id>_iter_K.png``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from rl4pix_jax.data import records


def load_examples(dataset_dir: str, split: str, resolution: int,
                  max_examples: Optional[int] = None, multi_turn: bool = False) -> List[dict]:
  """Examples of a split, decoded (``records.decode_record``) at ``resolution``, each with
  ``index`` (its position in the split) and ``record`` (raw).

  Single-turn: the first ``max_examples`` records in stored order. Multi-turn: the first
  ``max_examples`` sessions (see the module docstring), every turn of each, ordered by
  ``session_order``.

  Raises:
    ValueError: an empty selection, ``max_examples`` < 1, or (multi-turn) an incomplete or
      repeated session (``session_order``).
  """
  from rl4pix_jax.data import loader  # pylint: disable=import-outside-toplevel
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples={max_examples}: pass a positive number of "
                     f"{'sessions' if multi_turn else 'examples'} (or leave it out for all).")
  source = loader.open_split(dataset_dir, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {dataset_dir!r} has no examples to evaluate.")
  if multi_turn:
    ids = [records.as_text(source[i]["example_id"]) for i in range(len(source))]
    sessions = session_order(ids)
    indices = [i for session in sessions[:max_examples] for i in session]
  else:
    count = len(source) if max_examples is None else min(max_examples, len(source))
    indices = list(range(count))
  return decode_examples([source[i] for i in indices], resolution, indices)


def decode_examples(raw: Sequence[dict], resolution: int,
                    indices: Optional[Sequence[int]] = None) -> List[dict]:
  """Raw records (``loader.open_split`` items, ``shapes.example_to_record`` dicts) as the
  examples of an evaluation: decoded at ``resolution``, each with ``index`` (its position in
  the split: ``indices``, default 0..N-1) and ``record``."""
  indices = list(range(len(raw))) if indices is None else list(indices)
  out = []
  for i, record in zip(indices, raw):
    example = records.decode_record(record, resolution, i)
    example.update(index=i, record=record)
    out.append(example)
  return out


def turn_key(example_id: str) -> tuple:
  """(image id, turn) of a MagicBrush ``"<img_id>-<turn>"`` id; (id, 1) without a turn."""
  head, _, tail = example_id.rpartition("-")
  return (head, int(tail)) if head and tail.isdigit() else (example_id, 1)


def session_order(example_ids: Sequence[str]) -> List[List[int]]:
  """Multi-turn sessions of a list of ids: per image id (sorted: numerically when the id is a
  number, numbers first), the positions of its turns sorted by turn.

  Raises:
    ValueError: an (image, turn) that occurs twice, or a session whose turns are not exactly
      1..K (the message names the session and the fix).
  """
  sessions: Dict[str, Dict[int, int]] = {}
  for position, example_id in enumerate(example_ids):
    image, turn = turn_key(example_id)
    turns = sessions.setdefault(image, {})
    if turn in turns:
      raise ValueError(f"Multi-turn: example id {example_id!r} occurs twice (positions "
                       f"{turns[turn]} and {position}); each (image, turn) must be unique. "
                       "Rebuild the dataset from shards without duplicated rows.")
    turns[turn] = position
  out = []
  for image in sorted(sessions, key=lambda i: (0, int(i), i) if i.isdigit() else (1, 0, i)):
    turns = sessions[image]
    ordered = sorted(turns)
    if ordered != list(range(1, len(ordered) + 1)):
      missing = sorted(set(range(1, max(ordered) + 1)) - set(ordered))
      raise ValueError(
          f"Multi-turn: session {image!r} has turns {ordered}, but turns must be exactly "
          f"1..K (missing: {missing}), since each turn edits the previous turn's output. "
          "A record skipped at build "
          "time (--skip_bad_records) or a partial split does this: fix or restore the "
          "record and rebuild the dataset, or evaluate with --setting=single_turn.")
    out.append([turns[t] for t in ordered])
  return out


def final_turn_indices(example_ids: Sequence[str]) -> List[int]:
  """Positions of each session's final turn (the multi-turn scores), in session order."""
  return [session[-1] for session in session_order(example_ids)]
