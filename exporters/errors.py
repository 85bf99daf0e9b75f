"""Bad-input errors of the exporters and the CLI wrapper that prints them as one line.

The project's only error class: defined here because the exporters import nothing from the
torch side, and mote_edge.errors re-exports it as MoteError for the core.
"""
from __future__ import annotations

import argparse
import functools
import sys


class MoteExportError(Exception):
    """Bad input: the message says what is wrong and what is accepted."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-option errors (unknown flag, missing value, invalid int or choice) are the project's
    one `error:` line and exit 2, not argparse's usage block plus `PROG: error: ...`."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def cli_entry(func):
    """Wrap a CLI `main`: MoteExportError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(argv=None):
        try:
            return func(argv)
        except MoteExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
