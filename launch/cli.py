"""The command-line boundary of every ``launch/*.py`` entry point: one line per error, quiet logs.

Each command ends with ``cli.run(main)`` instead of ``absl.app.run(main)``. Then:

  - a bad flag, an unknown ``--config.`` field (with "did you mean"), a missing config file,
    and the project's own usage errors (config validation, a bad run folder, ...) print one
    line, ``error: <flag or file>=<value>: <what is wrong>; <fix>``, and exit 2;
  - the project's failures (an unreadable checkpoint, a training error, a bad record, a
    missing or unreadable data file) print one line and exit 1; any other exception is a bug
    and keeps its traceback;
  - the traceback of a one-line error is printed too with ``--verbosity=1`` or the
    environment variable ``RL4PIX_TRACEBACK=1``;
  - library INFO logs (Orbax, absl, JAX's backend probes such as "Unable to initialize
    backend 'tpu'", TensorFlow's C++ logs) are shown only with ``--verbosity=0`` or higher:
    by default only warnings and the command's own output are printed;
  - ``--help`` (``-h``) prints the module docstring with its line breaks, the command's
    flags and, for commands with a ``--config`` file, every config field with its default
    (override any with ``--config.<path>=<value>``), and exits 0.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable, List, Optional

from absl import app, flags
from absl import logging as absl_logging

TRACEBACK_ENV = "RL4PIX_TRACEBACK"
USAGE_ERROR = 2
FAILURE = 1
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")

# A usage error found while the flags were being defined (a misspelt --config. override is
# seen by ml_collections at definition time); reported by ``run`` before anything else.
_PENDING: List[str] = []
_CONFIG_FLAGS: List[str] = []


def _flag_value(argv: List[str], name: str) -> Optional[str]:
  """The value of ``--name=value`` / ``--name value`` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def load_config_file(spec: str, flag_name: str = "config") -> Any:
  """The ConfigDict of ``path[:arg]``; a missing or broken file is a one-line UsageError."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise app.UsageError(f"--{flag_name}={spec}: no such config file (from {os.getcwd()}); "
                         f"e.g. --{flag_name}=configs/shapes.py.")
  try:
    module_spec = importlib.util.spec_from_file_location("_rl4pix_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise app.UsageError(f"--{flag_name}={spec}: cannot load the config file "
                         f"({type(e).__name__}: {e}).") from None


def check_overrides(config: Any, argv: List[str], flag_name: str = "config") -> None:
  """A UsageError naming the first ``--config.<path>`` of argv that is not a config field."""
  prefix = f"--{flag_name}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split("=", 1)[0]
    node, walked = config, []
    for part in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
        where = ".".join(walked)
        hint = (f"did you mean {prefix}{'.'.join(walked + [close[0]])}?" if close else
                f"the fields{' of ' + prefix + where if where else ''} are "
                f"{', '.join(map(str, keys[:12]))}{', ...' if len(keys) > 12 else ''}")
        raise app.UsageError(f"{arg}: no config field {part!r}"
                             f"{' in ' + prefix + where if where else ''}; {hint}")
      node, walked = node[part], walked + [part]


def define_config_file(name: str = "config", default: str = "configs/shapes.py",
                       help_string: str = "Run config (ml_collections).") -> None:
  """``config_flags.DEFINE_config_file`` whose bad file or override is one line at ``run``."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  _CONFIG_FLAGS.append(name)
  argv = list(sys.argv)
  sys_argv = None
  if not any(a in HELP_FLAGS for a in argv):
    try:
      check_overrides(load_config_file(_flag_value(argv, name) or default, name), argv, name)
    except app.UsageError as e:
      _PENDING.append(str(e))
      sys_argv = argv[:1]  # define the flag without the overrides; run() reports the error
  config_flags.DEFINE_config_file(name, default, help_string, lock_config=True,
                                  sys_argv=sys_argv)


def traceback_wanted(argv: Optional[List[str]] = None) -> bool:
  """``--verbosity``/``-v`` >= 1 in argv, or RL4PIX_TRACEBACK set to a true value."""
  if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
    return True
  level = _flag_value(argv if argv is not None else sys.argv, "verbosity")
  level = level if level is not None else _flag_value(argv or sys.argv, "v")
  try:
    return level is not None and int(level) >= 1
  except ValueError:
    return False


def _verbosity_given(argv: List[str]) -> bool:
  return any(a.startswith(("--verbosity", "-v=", "--v=")) or a == "-v" for a in argv)


def quiet_libraries(argv: List[str]) -> None:
  """Hides library INFO logs unless a verbosity was asked for (see the module docstring)."""
  if _verbosity_given(argv):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import logging  # pylint: disable=import-outside-toplevel
  for name in ("jax._src.xla_bridge", "jax._src.compiler", "absl", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)


def error_exit_code(error: BaseException) -> Optional[int]:
  """2 for usage errors, 1 for the project's failures, None for anything else (a bug)."""
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax import config_validation
  from rl4pix_jax.data.records import DataFileError, RecordError
  from rl4pix_jax.evaluation.request import EvaluationError
  from rl4pix_jax.models.clip import CLIPConfigError
  from rl4pix_jax.parallel import ParallelError
  from rl4pix_jax.rl.batching import TrainingError
  from rl4pix_jax.rl.run_loading import RunLoadingError
  from rl4pix_jax.weights.folders import WeightsError
  from rl4pix_jax.workdir.checkpointer import CheckpointError
  usage = (app.UsageError, flags.Error, config_validation.ConfigError, RunLoadingError,
           EvaluationError, WeightsError, CLIPConfigError, ParallelError)
  failures = (CheckpointError, TrainingError, RecordError, DataFileError, OSError)
  if isinstance(error, usage):
    return USAGE_ERROR
  if isinstance(error, failures):
    return FAILURE
  return None


def one_line(error: BaseException, limit: int = 400) -> str:
  """The error as one line: newlines folded, at most ``limit`` characters."""
  text = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, OSError) and error.filename and error.filename not in text:
    text = f"{error.filename}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _StepParser(flags.ArgumentParser):
  """``--step``: an RL checkpoint epoch (an integer >= 0) or ``best``."""

  def parse(self, argument):
    if argument is None or (isinstance(argument, int) and not isinstance(argument, bool)):
      return argument
    text = str(argument).strip().lower()
    if text == "best":
      return "best"
    try:
      value = int(text)
    except ValueError:
      value = -1
    if value < 0:
      raise ValueError(f"{argument!r} is neither an RL checkpoint epoch (an integer >= 0) nor "
                       "'best' (the checkpoint of the best validation success).")
    return value

  def flag_type(self):
    return "epoch or 'best'"


def define_step_flag(what: str = "RL checkpoint") -> None:
  """``--step``: an epoch, ``best`` (the best validation success, ``checkpoints_best/``) or,
  by default, the latest checkpoint; shared by launch.edit, launch.evaluate, launch.export."""
  flags.DEFINE(_StepParser(), "step", None,
               f"{what} epoch, or 'best': the checkpoint of the best validation success "
               "(a run trained with --config.train.eval_every > 0). Default: the latest.")


def fail(message: str, code: int = USAGE_ERROR) -> int:
  """Prints ``error: <message>`` on stderr and returns ``code`` (for ``return fail(...)``)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  return code


def _print_help(argv: List[str]) -> None:
  main_module = sys.modules.get("__main__")
  doc = (getattr(main_module, "__doc__", None) or "").strip("\n")
  if doc:
    print(doc + "\n")
  module_name = getattr(main_module, "__spec__", None)
  module_name = module_name.name if module_name else sys.argv[0]
  print(f"Flags of {module_name} (--verbosity=1 or {TRACEBACK_ENV}=1: tracebacks and library "
        "logs):")
  print(flags.FLAGS.main_module_help() or flags.FLAGS.module_help(sys.argv[0]))
  for name in _CONFIG_FLAGS:
    try:
      spec = _flag_value(argv, name) or flags.FLAGS[name].default_as_str.strip("'\"")
      config = load_config_file(spec, name)
    except (app.UsageError, KeyError):
      continue
    print(f"\nConfig fields of {spec} (override any with --{name}.<path>=<value>):")
    for path, value in _flatten(config):
      print(f"  --{name}.{path}={value!r}")


def _flatten(node: Any, prefix: str = ""):
  for key in node.keys():
    value = node[key]
    path = f"{prefix}{key}"
    if hasattr(value, "keys") and len(list(value.keys())):
      yield from _flatten(value, path + ".")
    else:
      yield path, value


def _parse(argv: List[str], parser: Optional[Callable[[List[str]], List[str]]] = None
           ) -> List[str]:
  if any(a in HELP_FLAGS for a in argv[1:]):
    _print_help(argv)
    sys.exit(0)
  if _PENDING:
    sys.exit(fail(_PENDING[0]))
  try:
    rest = parser(argv) if parser is not None else flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(fail(f"{one_line(e)} (see --help)"))
  if not _verbosity_given(argv):
    flags.FLAGS.verbosity = -1  # warnings and errors only; --verbosity=0 shows INFO logs
  return rest


def guarded(main: Callable[[List[str]], Optional[int]]) -> Callable[[List[str]], int]:
  """``main`` with the project's errors turned into one line and an exit code."""
  def wrapped(argv):
    try:
      return main(argv) or 0
    except Exception as e:  # pylint: disable=broad-except
      code = error_exit_code(e)
      if code is None:
        raise
      if traceback_wanted():
        traceback.print_exc()
      return fail(one_line(e), code)
  return wrapped


def run(main: Callable[[List[str]], Optional[int]],
        flags_parser: Optional[Callable[[List[str]], List[str]]] = None) -> None:
  """``absl.app.run(main)`` with this module's error, help and logging manners.

  Args:
    main: the command's main(argv); returns an exit code or None.
    flags_parser: parses argv instead of ``flags.FLAGS(argv)`` (as in ``app.run``).
  """
  quiet_libraries(sys.argv)
  absl_logging.use_absl_handler()
  app.run(guarded(main), flags_parser=lambda argv: _parse(argv, flags_parser))
