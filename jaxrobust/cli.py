"""What train.py and eval.py share: flag parsing, help, multi-process start-up
and user-facing errors.

User errors (bad flags, configs, data, workdirs, output paths) print one line,
`error: ...`, and exit with code 2, without a traceback; a diverged run exits
with code 1; a run stopped by SIGTERM or SIGINT exits with code 128 + the
signal number (143, 130) after saying what it kept. Warnings print as
`warning: ...` lines. `--help` (`-h`) lists a program's flags, `--helpfull`
every flag, and exit with code 0.
"""

import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, NoReturn
from pathlib import Path

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxrobust import checks, configs
from jaxrobust.training import loop as experiment
from jaxrobust.training import signals


# How absl and ml_collections report bad flags, config files and overrides.
_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError)
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-helpfull")
TRAINING_INTERRUPTED = "interrupted; the newest checkpoint is kept, rerun to resume"


def define_config_flag(default: str) -> Any:
  """`--config <file>` with `--config.<key>=<value>` overrides (ml_collections).

  ml_collections applies the overrides in sys.argv while defining the flag, so
  a bad override is reported (exit code 2) here.
  """
  try:
    return config_flags.DEFINE_config_file(
      "config", default, "Experiment config file; override settings with --config.<key>=<value>."
    )
  except Exception as e:  # pylint: disable=broad-except  # a config file raises anything
    fail(config_error(e, sys.argv))


def define_distributed_flags() -> None:
  """Flags that start a multi-process run with `jax.distributed.initialize`."""
  flags.DEFINE_boolean(
    "distributed",
    False,
    "Run as one of several processes (one per host, or per GPU). Without "
    "the three flags below, JAX finds them from the cluster: SLURM, Open "
    "MPI, Cloud TPU pod slices, Kubernetes (JAX_COORDINATOR_ADDRESS also works).",
  )
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, reachable from every process (implies --distributed).",
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes (implies --distributed).")
  flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 to num_processes - 1 (implies --distributed)."
  )


def init_distributed() -> bool:
  """Calls `jax.distributed.initialize` when the flags ask for several processes.

  Must run before anything starts JAX's backends. Returns True if it did.
  """
  f = flags.FLAGS
  explicit: dict[str, Any] = {
    name: f[name].value
    for name in ("coordinator_address", "num_processes", "process_id")
    if f[name].value is not None
  }
  if not (f.distributed or explicit):
    return False
  if "num_processes" in explicit:
    checks.integer_at_least("--num_processes", explicit["num_processes"], 1)
  if "process_id" in explicit:
    checks.require(
      0 <= explicit["process_id"] < explicit.get("num_processes", sys.maxsize),
      f"--process_id must lie in [0, --num_processes), got {explicit['process_id']}",
    )
  try:
    jax.distributed.initialize(**explicit)
  except (ValueError, RuntimeError) as e:
    raise checks.InputError(
      f"cannot start the multi-process run ({e}); pass "
      f"--coordinator_address, --num_processes and "
      f"--process_id"
    ) from None
  return True


def flag_in(argv: Sequence[str], name: str) -> str | None:
  """The --`name` value in `argv`, read before the flags are parsed."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """Parses absl flags (including ml_collections config flags) from `argv`.

  `--config NAME` names a packaged config (`jaxrobust.configs`); any other
  value is a path. Refuses arguments that are not flags.
  """
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + configs.resolve(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = configs.resolve(argv[i + 1])
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # a config file raises anything
    raise config_error(e, argv) from None
  if len(rest) > 1:
    raise checks.InputError(
      f"unexpected argument {rest[1]!r}; flags take the form --name=value (--help lists them)"
    )
  return rest


def config_path(config_flag: Any) -> str:
  """The file of an ml_collections config flag, without its `:setting` argument."""
  return config_flags.get_config_filename(flags.FLAGS[config_flag.name]).split(":", 1)[0]


def config_value(config_flag: Any) -> ml_collections.ConfigDict:
  """The config of an ml_collections config flag, loaded and overridden now.

  `--config path.py:setting` passes `setting` to the file's `get_config`.
  """
  path = config_path(config_flag)
  checks.require(os.path.isfile(path), f"config file {path!r} not found")
  try:
    config = config_flag.value
    if isinstance(config, ml_collections.ConfigDict):
      config.to_dict()
  except Exception as e:  # pylint: disable=broad-except  # a config file raises anything
    raise config_error(e, sys.argv, path) from None
  load_error = getattr(config, "_error", None)  # ml_collections' stand-in for a failed load
  if isinstance(load_error, Exception):
    raise config_error(load_error, sys.argv, path) from None
  checks.require(
    isinstance(config, ml_collections.ConfigDict),
    f"config file {path!r}: get_config() returned {type(config).__name__} "
    f"{repr(config)[:40]}, not an ml_collections.ConfigDict",
  )
  return config


def config_error(e: BaseException, argv: Sequence[str], path: str | None = None) -> Any:
  """The InputError of an exception raised while loading or overriding a config
  (by the config file `path`, by default the one --config in `argv` names).
  Re-raises `e` if it is none of those."""
  if isinstance(e, checks.InputError):
    return e
  path = path or _config_file_in(argv)
  if path and (error := _config_file_error(e, path)):
    return error
  if isinstance(e, _FLAG_ERRORS):
    return _flag_error(e, argv)
  raise e


def _config_file_in(argv):
  """The config file `--config` in `argv` names, or None."""
  value = flag_in(argv, "config")
  try:
    return value and configs.resolve(value).split(":", 1)[0]
  except checks.InputError:
    return None


def _same_file(a, b):
  return os.path.realpath(a) == os.path.realpath(b)


def _chain(e):
  """`e` and the exceptions it was raised from or while handling."""
  seen = []
  while e is not None and all(e is not s for s in seen):
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen


def _config_file_error(e, path):
  """An InputError naming config file `path` if `e` (or an exception it
  chains) was raised by its code, else None."""
  for error in _chain(e):
    if isinstance(error, SyntaxError) and error.filename and _same_file(error.filename, path):
      return checks.InputError(
        f"config file {path!r}: SyntaxError: {error.msg} (line {error.lineno})"
      )
    if isinstance(error, AttributeError) and "has no attribute 'get_config'" in str(error):
      return checks.InputError(f"config file {path!r} defines no get_config()")
    line, tb = None, error.__traceback__
    while tb is not None:
      if _same_file(tb.tb_frame.f_code.co_filename, path):
        line = tb.tb_lineno
      tb = tb.tb_next
    if line is not None:
      message = (str(error).strip().splitlines() or [""])[0]
      return checks.InputError(
        f"config file {path!r} raised {type(error).__name__} at line {line}: {message}"
      )
  return None


def _flag_error(e, argv):
  if "Error whilst parsing config file" in str(e):  # ml_collections adds the traceback
    return checks.InputError(f"bad config: {str(e).strip().splitlines()[-1]}")
  if isinstance(e, flags.Error):
    return checks.InputError(str(e))
  cause = e.__cause__ or e
  if isinstance(e, AttributeError) and isinstance(e.args[0] if e.args else None, KeyError):
    cause = e.args[0]  # ml_collections: AttributeError(KeyError("'key'\nDid you mean ..."))
  if isinstance(cause, (KeyError, AttributeError)):
    return unknown_setting(str(cause.args[0]) if cause.args else "", argv)
  return checks.InputError(f"bad flag or config: {type(cause).__name__}: {cause}")


def unknown_setting(text: str, argv: Sequence[str]) -> checks.InputError:
  """The InputError of an override of a config key that does not exist;
  `text` is ml_collections' message (the key, maybe a suggestion)."""
  match = re.match(r"""\s*['"]?([^'"\n]*)""", text)
  key = match.group(1) if match else text
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  overrides = [
    arg[2:].split("=", 1)[0][len("config.") :] for arg in argv if arg.startswith("--config.")
  ]
  name = next((o for o in overrides if key in o.split(".")), key)
  message = f"the config has no setting {name!r}"
  if suggestion:
    parts = name.split(".")
    parts[parts.index(key) if key in parts else -1] = suggestion.group(1)
    message += f"; did you mean {'.'.join(parts)!r}?"
  return checks.InputError(message)


def check_output_file(flag: str, path: str | Path) -> Path:
  """Refuses an output file `path` (given by `flag`) that cannot be written:
  a directory, or one whose folder does not exist or cannot be written.
  Checked before the work that writes it starts. Returns `path` as a Path."""
  path = Path(path)
  checks.require(str(path).strip(), f"{flag} needs a file name")
  checks.require(not path.is_dir(), f"{flag} {str(path)!r} is a directory; give a file name")
  checks.writable_folder(flag, path)
  return path


def help_requested(argv: Sequence[str]) -> str | None:
  """`--help`, `-h` or `--helpshort` ("short"), `--helpfull` ("full"), or None."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in HELP_FLAGS:
      return "full" if arg.endswith("helpfull") else "short"
  return None


def usage(module: ModuleType, full: bool = False, extra: Sequence[tuple[str, str]] = ()) -> str:
  """The help of a program: its docstring and its flags, one line each (with
  `full`, also the flags of the libraries it uses); `extra`: (flag, help)
  lines to add."""
  by_module = flags.FLAGS.flags_by_module_dict()
  # The program's own flags, and those of the modules it names in FLAG_MODULES.
  names = (module.__name__, *getattr(module, "FLAG_MODULES", ()), sys.argv[0] if sys.argv else None)
  own = [f for m in by_module if m in names for f in by_module[m]]
  own += by_module.get(__name__, [])
  lines = [(module.__doc__ or "").strip(), "", "flags:"]
  lines += [_flag_line(f) for f in sorted(own, key=lambda f: f.name)]
  lines += [f"  {name}: {text}" for name, text in extra]
  lines.append("  --help (-h): this help; --helpfull: every flag, the libraries' too")
  if full:
    for m in sorted(set(by_module) - set(names) - {__name__}):
      lines += ["", f"{m}:"] + [_flag_line(f) for f in sorted(by_module[m], key=lambda f: f.name)]
  return "\n".join(lines)


def _flag_line(flag):
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  help_text = " ".join((flag.help or "").split())
  default = flag.default_as_str
  if default and Path(default.strip("'")).parent == configs.DIRECTORY:
    default = repr(Path(default.strip("'")).stem)  # a packaged config, by name
  return f"  {name}: {help_text}" + (f" (default: {default})" if default else "")


def _redeliver_interrupt(unraisable, previous=sys.unraisablehook):
  """A Ctrl-C that arrived in a callback Python cannot raise from (a garbage
  collector callback, `__del__`) is delivered to the main thread again, not
  swallowed; other exceptions go to the previous hook."""
  if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
    # Sent from another thread once the callback has returned (raised here,
    # it would be swallowed again); a signal, which also ends a sleep.
    main = threading.main_thread().ident
    timer = threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT))
    timer.daemon = True
    timer.start()
  else:
    previous(unraisable)


def _show_warning(message, category, filename, lineno, file=None, line=None):
  del category, filename, lineno, line
  print(f"warning: {message}", file=file or sys.stderr)


def run(
  main: Callable[[Sequence[str]], Any],
  argv: Sequence[str] | None = None,
  *,
  interrupted: str | Callable[[], str] = TRAINING_INTERRUPTED,
  help_extra: Sequence[tuple[str, str]] = (),
) -> None:
  """Calls `main(argv)`, turning user errors into a message and an exit code.

  `interrupted`: what to say (a string, or a function returning one) when
  Ctrl-C (SIGINT) stops the program, which exits with code 130. `--help`
  prints `usage` of `main`'s module (with `help_extra` lines) and exits.
  """
  argv = sys.argv if argv is None else argv
  warnings.showwarning = _show_warning
  if sys.unraisablehook is not _redeliver_interrupt:
    sys.unraisablehook = _redeliver_interrupt
  try:
    if which := help_requested(argv):
      print(usage(sys.modules[main.__module__], full=which == "full", extra=help_extra))
      sys.exit(0)
    main(argv)
  except checks.InputError as e:
    fail(e)
  except experiment.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except signals.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
    sys.exit(130)


def fail(error: BaseException) -> NoReturn:
  """Reports a user error and exits with code 2."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
  """Turns a failure to write output file `path` into an InputError naming it."""
  try:
    yield
  except OSError as e:
    raise checks.InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
