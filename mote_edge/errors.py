"""One error type for bad user input, and the CLI wrapper that turns it into one clear line."""
from __future__ import annotations

import functools
import sys


class MoteError(Exception):
    """Bad input: the message says what is wrong and what is accepted."""


def cli_entry(func):
    """Wrap a CLI `main`: MoteError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(argv=None):
        try:
            return func(argv)
        except MoteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
