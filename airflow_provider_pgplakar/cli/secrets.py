"""Where the CLI gets a passphrase or raw key: environment, file, or a terminal prompt — never argv."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from ..store.errors import StoreError


def _read_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().rstrip("\r\n")
    except OSError as e:
        raise StoreError(f"cannot read {what} file {path}: {e.strerror}") from None
    if not value:
        raise StoreError(f"the {what} file {path} is empty: write the {what} into it (one line)")
    return value


def passphrase(file: str | None, *, prompt: str = "passphrase", confirm: bool = False,
               env: str = "PGPLAKAR_PASSPHRASE") -> str | None:
    if file:
        return _read_file(file, "passphrase")
    if os.environ.get(env):
        return os.environ[env]
    if sys.stdin.isatty():
        try:
            value = getpass.getpass(f"{prompt}: ")
            if confirm and getpass.getpass(f"repeat {prompt}: ") != value:
                raise StoreError("the passphrases do not match")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D at the prompt: the user gave up, as with Ctrl-C
            sys.stderr.write("\n")  # end the prompt's line: "pgplakar: interrupted" gets its own
            raise KeyboardInterrupt from None
        return value
    return None


def raw_key(file: str | None) -> str | None:
    if file:
        return _read_file(file, "key")
    return os.environ.get("PGPLAKAR_KEY") or None
