"""What train.py and eval.py share: flag parsing and user-facing errors.

User errors (bad flags, configs, data, workdirs) print one line, `error: ...`,
and exit with code 2, without a traceback; a diverged run exits with code 1.
"""
import sys

from absl import flags

from jaxrobust import checks, experiment


def parse_flags(argv):
  """Parses absl flags (including ml_collections config flags) from `argv`."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise checks.InputError(str(e)) from None
  except (KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError) as e:
    # ml_collections reports unknown override keys and broken config files so.
    raise checks.InputError(f"bad flag or config: {type(e).__name__}: {e}") from None


def run(main, argv=None):
  """Calls `main(argv)`, turning user errors into a message and an exit code."""
  try:
    main(sys.argv if argv is None else argv)
  except checks.InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except experiment.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted; the newest checkpoint is kept, rerun to resume", file=sys.stderr)
    sys.exit(130)
