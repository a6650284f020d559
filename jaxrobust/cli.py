"""What train.py and eval.py share: flag parsing, multi-process start-up and
user-facing errors.

User errors (bad flags, configs, data, workdirs) print one line, `error: ...`,
and exit with code 2, without a traceback; a diverged run exits with code 1; a
run stopped by SIGTERM or SIGINT saves a checkpoint and exits with code 128 +
the signal number (143, 130). Warnings print as `warning: ...` lines.
"""

import os
import sys
import warnings

import jax
from absl import flags
from ml_collections import config_flags

from jaxrobust import checks, configs, experiment, signals


# How absl and ml_collections report bad flags, config files and overrides.
_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError)


def define_config_flag(default):
  """`--config <file>` with `--config.<key>=<value>` overrides (ml_collections).

  ml_collections applies the overrides in sys.argv while defining the flag, so
  a bad override is reported (exit code 2) here.
  """
  try:
    return config_flags.DEFINE_config_file(
      "config", default, "Experiment config file; override settings with --config.<key>=<value>."
    )
  except _FLAG_ERRORS as e:
    fail(_flag_error(e))


def define_distributed_flags():
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


def init_distributed():
  """Calls `jax.distributed.initialize` when the flags ask for several processes.

  Must run before anything starts JAX's backends. Returns True if it did.
  """
  f = flags.FLAGS
  explicit = {
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


def parse_flags(argv):
  """Parses absl flags (including ml_collections config flags) from `argv`.

  `--config NAME` names a packaged config (`jaxrobust.configs`); any other
  value is a path.
  """
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + configs.resolve(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = configs.resolve(argv[i + 1])
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    raise _flag_error(e) from None


def config_path(config_flag):
  """The file of an ml_collections config flag, without its `:setting` argument."""
  return config_flags.get_config_filename(flags.FLAGS[config_flag.name]).split(":", 1)[0]


def config_value(config_flag):
  """The config of an ml_collections config flag, loaded and overridden now.

  `--config path.py:setting` passes `setting` to the file's `get_config`.
  """
  path = config_path(config_flag)
  checks.require(os.path.isfile(path), f"config file {path!r} not found")
  try:
    config = config_flag.value
    config.to_dict()  # a config file that failed to load raises only on use
    return config
  except _FLAG_ERRORS as e:
    raise _flag_error(e) from None


def _flag_error(e):
  if "Error whilst parsing config file" in str(e):  # ml_collections adds the traceback
    return checks.InputError(f"bad config: {str(e).strip().splitlines()[-1]}")
  if isinstance(e, flags.Error):
    return checks.InputError(str(e))
  cause = e.__cause__ or e
  if isinstance(cause, (KeyError, AttributeError)):
    return checks.InputError(f"the config has no setting {str(cause.args[0]).strip(chr(34))}")
  return checks.InputError(f"bad flag or config: {type(cause).__name__}: {cause}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
  del category, filename, lineno, line
  print(f"warning: {message}", file=file or sys.stderr)


def run(main, argv=None):
  """Calls `main(argv)`, turning user errors into a message and an exit code."""
  warnings.showwarning = _show_warning
  try:
    main(sys.argv if argv is None else argv)
  except checks.InputError as e:
    fail(e)
  except experiment.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except signals.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print("interrupted; the newest checkpoint is kept, rerun to resume", file=sys.stderr)
    sys.exit(130)


def fail(error):
  """Reports a user error and exits with code 2."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)
