"""Every config key the code reads is declared in configs/shapes.py, and read without a default.

An AST scan of the package and the launch mains finds each read of the run config,
``config.<section>.<key>``, ``config.<section>["key"]`` and ``config.<section>.get("key")``
(also through the names a module gives a section, e.g. ``reward_config``), and resolves it in
``configs/shapes.get_config()``: a key that is not declared there fails with its file and line, and
so does any ``.get(...)`` on a config section (its default would be a second default, in code).
Not scanned: models/, weights/ and diffusion/ read diffusers / transformers config dicts of
pretrained folders (``unet_config.json`` ...), whose defaults are diffusers' own.
"""

import ast
import dataclasses
import glob
import os

import ml_collections

from configs import ip2p_magicbrush, shapes
from rl4pix_jax.rl import ppo
from tests.helpers.paths import REPO_ROOT

SCANNED = ("rl4pix_jax", "launch")
NOT_SCANNED = ("rl4pix_jax/models/", "rl4pix_jax/weights/", "rl4pix_jax/diffusion/")
# Name -> the config section it holds, everywhere; and per module where ``config`` is a section.
ROOTS = {"config": "", "reward_config": "reward"}
MODULE_ROOTS = {"rl4pix_jax/rewards/builtin.py": {"config": "reward"}}
# Names called ``config`` that are not the run config: (module, function) -> why.
NOT_RUN_CONFIG = {
    ("rl4pix_jax/workdir/stages.py", "stage_complete"): "a stage's model_config.json dict",
    ("rl4pix_jax/rl/run_loading.py", "upgrade_attention_keys"):
        "an old run's saved config.json, which may lack keys that configs/shapes.py has now",
}
CONFIG_METHODS = set(dir(ml_collections.ConfigDict))
SECTIONS = {k for k, v in shapes.get_config().items() if isinstance(v, ml_collections.ConfigDict)}


def _chain(node):
  """(root name, [(key, how)]) of ``name.a["b"].get("c")``-like expressions, else None."""
  keys = []
  while True:
    if isinstance(node, ast.Attribute):
      keys.append((node.attr, "attr"))
      node = node.value
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
      keys.append((node.slice.value, "item"))
      node = node.value
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)):
      keys.append((node.args[0].value, "get"))
      node = node.func.value
    else:
      break
  if isinstance(node, ast.Name):
    return node.id, keys[::-1]
  return None


def _config_reads(path):
  """(line, root section, [(key, how)]) of every read of a config name in the module."""
  relative = os.path.relpath(path, REPO_ROOT)
  roots = dict(ROOTS, **MODULE_ROOTS.get(relative, {}))
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  skipped = set()
  for function in ast.walk(tree):
    if isinstance(function, ast.FunctionDef) and (relative, function.name) in NOT_RUN_CONFIG:
      skipped.update(id(n) for n in ast.walk(function))
  inner = set()  # nodes inside a longer chain: only the whole chain is a read
  for node in ast.walk(tree):
    if isinstance(node, (ast.Attribute, ast.Subscript)):
      inner.add(id(node.value))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      inner.add(id(node.func))
  reads = []
  for node in ast.walk(tree):
    if (id(node) in skipped or id(node) in inner
        or not isinstance(node, (ast.Attribute, ast.Subscript, ast.Call))):
      continue
    found = _chain(node)
    if not found or found[0] not in roots or not found[1]:
      continue
    section, keys = roots[found[0]], found[1]
    # ``config`` names many things (LoaderConfig, CLIP configs, ...): a read of the run config
    # starts with one of its sections.
    if section or keys[0][0] in SECTIONS:
      reads.append((node.lineno, section, keys))
  return relative, reads


def _problems(config):
  problems = []
  files = [p for d in SCANNED for p in glob.glob(f"{REPO_ROOT}/{d}/**/*.py", recursive=True)]
  assert len(files) > 50
  count = 0
  for path in sorted(files):
    relative, reads = _config_reads(path)
    if relative.startswith(NOT_SCANNED):
      continue
    for line, section, keys in reads:
      node, where = (config[section] if section else config), section
      for key, how in keys:
        if not isinstance(node, ml_collections.ConfigDict):
          break  # a declared dict (e.g. model.unet: a diffusers config) or a value
        if how == "attr" and key not in node and key in CONFIG_METHODS:
          break  # config.train.items(), config.to_json_best_effort(), ...
        name = f"{where}.{key}" if where else str(key)
        count += 1
        if how == "get":
          problems.append(f"{relative}:{line}: {name} read with .get(): read it directly "
                          "(its default belongs in configs/shapes.py)")
        if key not in node:
          problems.append(f"{relative}:{line}: {name} is not declared in configs/shapes.py")
          break
        node, where = node[key], name
  return problems, count


def test_every_config_read_is_declared_once_in_shapes():
  problems, count = _problems(shapes.get_config())
  assert count > 100  # the scan sees the reads (trainer, run_setup, compiled, rewards, ...)
  assert not problems, "\n".join(problems)


def test_the_scan_finds_an_undeclared_key_and_a_get(tmp_path):
  """The scan is not vacuous: a module reading an undeclared key, and one with .get, fail."""
  module = tmp_path / "rl4pix_jax" / "bad.py"
  module.parent.mkdir()
  module.write_text("def f(config, reward_config):\n"
                    "  return config.data.splitt, reward_config.get('clip_text', 'caption')\n")
  relative, reads = _config_reads(str(module))
  assert [(line, section, [k for k, _ in keys]) for line, section, keys in reads] == [
      (2, "", ["data", "splitt"]), (2, "reward", ["clip_text"])]


def test_data_split_and_config_name_are_overridable():
  config = shapes.get_config()
  assert config.data.split == "train" and config.data.config_name == ""
  config.data.split = "validation"  # a declared key: no AttributeError


def test_ppo_config_defaults_are_the_config_defaults():
  """PPOConfig's own defaults (used when it is built directly) equal configs/shapes.py's."""
  declared = shapes.get_config().ppo
  assert {f.name for f in dataclasses.fields(ppo.PPOConfig)} == set(declared.keys())
  assert ppo.PPOConfig() == ppo.PPOConfig.from_config(declared)
  # The real run overrides only values, never adds keys.
  assert set(ip2p_magicbrush.get_config("full").ppo.keys()) == set(declared.keys())
