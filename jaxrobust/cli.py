"""What train.py and eval.py share: flag parsing and user-facing errors.

User errors (bad flags, configs, data, workdirs) print one line, `error: ...`,
and exit with code 2, without a traceback; a diverged run exits with code 1.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxrobust import checks, experiment


# How absl and ml_collections report bad flags, config files and overrides.
_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError,
                OSError, SyntaxError)


def define_config_flag(default):
  """`--config <file>` with `--config.<key>=<value>` overrides (ml_collections).

  ml_collections applies the overrides in sys.argv while defining the flag, so
  a bad override is reported (exit code 2) here.
  """
  try:
    return config_flags.DEFINE_config_file(
        "config", default,
        "Experiment config file; override settings with --config.<key>=<value>.")
  except _FLAG_ERRORS as e:
    fail(_flag_error(e))


def parse_flags(argv):
  """Parses absl flags (including ml_collections config flags) from `argv`."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    raise _flag_error(e) from None


def config_value(config_flag):
  """The config of an ml_collections config flag, loaded and overridden now."""
  path = config_flags.get_config_filename(flags.FLAGS[config_flag.name])
  checks.require(os.path.isfile(path), f"config file {path!r} not found")
  try:
    config = config_flag.value
    config.to_dict()  # a config file that failed to load raises only on use
    return config
  except _FLAG_ERRORS as e:
    raise _flag_error(e) from None


def _flag_error(e):
  if isinstance(e, flags.Error):
    return checks.InputError(str(e))
  cause = e.__cause__ or e
  if isinstance(cause, (KeyError, AttributeError)):
    return checks.InputError(f"the config has no setting {str(cause.args[0]).strip(chr(34))}")
  return checks.InputError(f"bad flag or config: {type(cause).__name__}: {cause}")


def run(main, argv=None):
  """Calls `main(argv)`, turning user errors into a message and an exit code."""
  try:
    main(sys.argv if argv is None else argv)
  except checks.InputError as e:
    fail(e)
  except experiment.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted; the newest checkpoint is kept, rerun to resume", file=sys.stderr)
    sys.exit(130)


def fail(error):
  """Reports a user error and exits with code 2."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)
