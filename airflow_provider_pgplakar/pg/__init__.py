"""PostgreSQL tool layer: option parsing, client-tool discovery, argv builders, libpq environment.

PostgreSQL logic around ``pg_dump``/``pg_restore``/``psql`` and the replication protocol; it imports no Airflow, so
the CLI, the operators and the tests share one implementation (docs/architecture.md lists every module).

Submodules:

- :mod:`.location`: split a ``postgres://`` / ``postgres+aws://`` / ``postgres+bin://`` location URI into its parts.
- :mod:`.options`: merge a parsed location with ``key=value`` options into frozen dataclasses, refusing every
  invalid value before anything runs.
- :mod:`.session`: what one backup or restore run shares (:class:`.session.Session`) and a snapshot's record paths.
- :mod:`.secrets`: materialise inline SSL PEM data into private temp files and build the child environment
  (passwords and SSL settings reach tools through the environment, never argv).
- :mod:`.tools`: find client tools and probe their versions.
- :mod:`.commands`: pure argv builders, one per tool.

The exception hierarchy lives here so every submodule can raise it without import cycles.
"""

from __future__ import annotations

REDACTED = "***"  # in place of a secret in reprs and messages


class PgError(Exception):
    """Base class of every failure raised by the PostgreSQL tool layer."""


class OptionError(PgError, ValueError):
    """An option value is invalid, unknown, or contradicts another option.

    ``option`` is the name the user wrote (``location`` for anything inside the URI), so the message can point at
    the exact thing to fix. The message never contains a password or PEM data.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(option, message)
        self.option = option
        self.message = message

    def __str__(self) -> str:
        return f"{self.option}: {self.message}"


class ToolError(PgError):
    """Base class of client-tool discovery failures."""


class ToolNotFound(ToolError):
    """No executable of the requested tool exists where we looked."""


class ToolBroken(ToolError):
    """A tool exists but ``--version`` failed or printed something that is not a PostgreSQL version."""


class ToolVersionError(ToolError):
    """Only tools older than required were found (pg_dump must be >= the server's major version)."""


__all__ = ["REDACTED", "OptionError", "PgError", "ToolBroken", "ToolError", "ToolNotFound", "ToolVersionError"]
