"""Rule-based object phrase and task type from a free-form edit instruction (for MagicBrush).

MagicBrush has no object annotation, but the attention reward needs the tokens of the object the
edit is about. ``extract_object_phrase`` returns a substring of the instruction (so it always
occurs in it) chosen by the first rule that matches, case-insensitively:

  1. "<replace verb> the X with/to/into/for ..."  (replace, change, turn, swap, transform,
     convert, make, paint, color, enlarge, shrink, reduce/increase the size of)
                                                  -> X   "change the cat to a dog" -> "cat"
     After make/turn/paint/color, a phrase of several words that runs to the end loses its
     last word, the result: "make the red car blue" -> "red car".
  2. "<remove verb> the X ..."  (remove, delete, erase, get rid of, take away/out/off, eliminate)
                                                  -> X   "remove the red car" -> "red car"
  3. "<add verb> a X ..."  (add, put, place, insert, draw, include, give, let there be,
     there should be, have)                       -> X   "add a hat on the man" -> "hat"
  4. the first "the/a/an/this/that X"             -> X   "what if the sky was pink" -> "sky"
  5. otherwise the last word that is not a stop word.

X runs from after the determiner up to (not including) the next stop word -- prepositions,
conjunctions, verbs of rule 1 such as "to"/"into"/"with", punctuation -- and at most
``MAX_PHRASE_WORDS`` words. Articles directly after the verb are skipped. The phrase of an
insertion is the inserted object. A user-supplied column overrides all of this (see
``magicbrush_builder``).

``classify_task`` maps an instruction to one of ``records.TASKS`` with the same verb lists:
removal verbs -> removal; insertion verbs -> insertion; a replace verb whose result starts with
an article ("turn the cat into a dog") -> replacement; anything else -> transformation.
"""

from __future__ import annotations

import re
from typing import List, Tuple

MAX_PHRASE_WORDS = 4
DETERMINERS = ("the", "a", "an", "some", "this", "that", "these", "those", "his", "her",
               "its", "their", "two", "three")
STOP_WORDS = frozenset((
    "to", "into", "with", "for", "in", "on", "at", "from", "by", "next", "near", "beside",
    "behind", "under", "over", "above", "below", "onto", "inside", "outside", "around",
    "and", "or", "but", "so", "instead", "as", "is", "are", "was", "were", "be", "being",
    "should", "would", "could", "can", "please", "then", "it", "them", "there", "here",
    "that", "which", "who", "while", "like", "make", "made", "look", "looks", "become",
    "now", "too", "very", "more", "less", "all", "up", "down", "off", "out", "away",
    "wear", "wearing", "hold", "holding", "have", "has", "had", "sit", "sitting", "stand",
    "standing", "eat", "eating", "if", "what",
) + DETERMINERS)
REPLACE_VERBS = ("replace", "change", "turn", "swap", "transform", "convert", "make", "paint",
                 "color", "colour", "reduce the size of", "increase the size of", "enlarge",
                 "shrink")
# "make the X Y" names the result Y last: when the phrase after these verbs runs to the end of
# the instruction, its last word is the result ("make the red car blue" -> "red car").
RESULT_LAST_VERBS = ("make", "turn", "paint", "color", "colour")
REMOVE_VERBS = ("remove", "delete", "erase", "get rid of", "take away", "take out",
                "take off", "eliminate", "get rid of all")
ADD_VERBS = ("add", "put", "place", "insert", "draw", "include", "give", "let there be",
             "there should be", "have")
_WORD = re.compile(r"[A-Za-z0-9'\-]+")


def _words(text: str) -> List[Tuple[str, int, int]]:
  """(lower-cased word, start, end) of each word of ``text``, punctuation kept as words."""
  tokens = []
  for match in re.finditer(r"[A-Za-z0-9'\-]+|[.,;:!?]", text):
    tokens.append((match.group(0).lower(), match.start(), match.end()))
  return tokens


def _phrase_from(text: str, words, position: int, result_last: bool = False) -> str:
  """The phrase starting at word ``position`` (determiners skipped) up to a stop word.

  With ``result_last``, a phrase of several words that runs to the end of the instruction
  (or to punctuation) loses its last word.
  """
  while position < len(words) and words[position][0] in DETERMINERS:
    position += 1
  end = position
  while (end < len(words) and end - position < MAX_PHRASE_WORDS
         and words[end][0] not in STOP_WORDS and _WORD.fullmatch(words[end][0])):
    end += 1
  if end == position:
    return ""
  at_end = end == len(words) or not _WORD.fullmatch(words[end][0])
  if result_last and at_end and end - position >= 2:
    end -= 1
  return text[words[position][1]:words[end - 1][2]]


def _find_verb(words, verbs) -> int:
  """Index of the word after the first occurrence of any (multi-word) verb, or -1."""
  lowered = [w[0] for w in words]
  best = -1
  for verb in verbs:
    parts = verb.split()
    for i in range(len(lowered) - len(parts) + 1):
      if lowered[i:i + len(parts)] == parts:
        after = i + len(parts)
        if best < 0 or after < best:
          best = after
        break
  return best


def extract_object_phrase(instruction: str) -> str:
  """The object phrase of an instruction (module docstring), a substring of it.

  Args:
    instruction: a non-empty edit instruction.
  Returns:
    The phrase, or "" when the instruction has no word that is not a stop word.
  """
  words = _words(instruction)
  for verbs in (REPLACE_VERBS, REMOVE_VERBS, ADD_VERBS):
    after = _find_verb(words, verbs)
    if after >= 0:
      result_last = verbs is REPLACE_VERBS and words[after - 1][0] in RESULT_LAST_VERBS
      phrase = _phrase_from(instruction, words, after, result_last)
      if phrase:
        return phrase
  for i, (word, _, _) in enumerate(words):
    if word in DETERMINERS:
      phrase = _phrase_from(instruction, words, i)
      if phrase:
        return phrase
  content = [w for w in words if w[0] not in STOP_WORDS and _WORD.fullmatch(w[0])]
  if not content:
    return ""
  return instruction[content[-1][1]:content[-1][2]]


def classify_task(instruction: str) -> str:
  """One of ``records.TASKS`` for an instruction (heuristic; module docstring)."""
  words = _words(instruction)
  remove_at = _find_verb(words, REMOVE_VERBS)
  add_at = _find_verb(words, ADD_VERBS)
  replace_at = _find_verb(words, REPLACE_VERBS)
  candidates = [(at, task) for at, task in ((remove_at, "removal"), (add_at, "insertion"),
                                            (replace_at, "replace")) if at >= 0]
  if not candidates:
    return "transformation"
  _, task = min(candidates)
  if task != "replace":
    return task
  lowered = [w[0] for w in words]
  for i in range(replace_at, len(lowered) - 1):
    if lowered[i] in ("to", "into", "with", "for") and lowered[i + 1] in ("a", "an", "some"):
      return "replacement"
  return "transformation"
