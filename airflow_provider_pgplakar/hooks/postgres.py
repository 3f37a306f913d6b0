"""Airflow hook: the PostgreSQL side of a backup or restore, from a standard ``postgres`` connection or a URI.

A standard Airflow ``postgres`` connection is read as: host, port, login, password, schema (= database), and the
extras ``sslmode``, ``sslcert``, ``sslkey``, ``sslrootcert`` that the Airflow postgres provider uses, plus any of
our option names (``exclude_databases``, ``compress``, ``pg_bin_dir``, …). Alternatively a ``location`` URI as
the CLI takes it (README, "Source options"). Operator ``options`` override both. Parsing is the :mod:`..pg.options`
code the CLI uses, so every invalid value fails before anything runs, naming the option.

RDS/Aurora IAM authentication, as with the Airflow postgres provider: the extra ``"iam": true`` makes the
connection ``postgres+aws`` (a fresh IAM token per connection and tool process instead of a password, which is
then refused), with the optional extras ``region_name`` and ``aws_conn_id``. Without ``aws_conn_id`` the token is
signed with boto3's standard credential chain (boto3 alone is enough); with it, with the credentials and region of
that AWS connection, which needs the Amazon provider (imported only then). A ``postgres+aws://`` location works too.
Every token is registered with ``mask_secret``. :meth:`~PgPlakarPostgresHook.source_options` and
:meth:`~PgPlakarPostgresHook.restore_options` return the options together with the connection's ``aws_conn_id``
(:class:`HookOptions`); :func:`password_source` takes both, so the hook keeps no state between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from airflow.sdk import BaseHook

from ..pg import OptionError
from ..pg.iam import IamAuthError, IamTokenSource, PasswordSource, resolve_region
from ..pg.location import AWS, LOGICAL, PHYSICAL, parse_location
from ..pg.options import (
    SSL_KEY_DATA_ALIAS,
    TRUE_WORDS,
    LogicalSourceOptions,
    PhysicalSourceOptions,
    RestoreOptions,
    parse_restore_options,
    parse_source_options,
)

log = logging.getLogger(__name__)
Opts = TypeVar("Opts", LogicalSourceOptions, RestoreOptions)

_SSL_EXTRAS = {"sslmode": "ssl_mode", "sslcert": "ssl_cert", "sslkey": "ssl_key", "sslrootcert": "ssl_root_cert"}
# Extras of the Airflow postgres provider that mean nothing for dump tools (not errors).
_IGNORED_EXTRAS = {"cursor", "iam", "aws_conn_id", "redshift", "connect_timeout", "options", "client_encoding",
                   "sslcrl", "keepalives", "keepalives_idle", "application_name", "region_name",
                   "enable_log_db_messages", "sqlalchemy_scheme", "sqlalchemy_options"}


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in TRUE_WORDS)


def _aws_base_hook(aws_conn_id: str) -> Any:
    """The Amazon provider's AwsBaseHook for ``aws_conn_id`` (the provider is optional: imported only here)."""
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError:
        raise IamAuthError(
            f"aws_conn_id {aws_conn_id!r} needs the Amazon provider: pip install apache-airflow-providers-amazon "
            "(or remove aws_conn_id to sign IAM tokens with boto3's default credential chain)"
        ) from None
    return AwsBaseHook(aws_conn_id=aws_conn_id, client_type="rds")


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


_KEY_DATA_NAMES = ("ssl_key_data", SSL_KEY_DATA_ALIAS)  # one option under two names


def _override(opts: dict[str, str], overrides: Mapping[str, Any] | None) -> None:
    """Apply operator ``options`` over the connection's: an inline key under either name replaces the other."""
    for key, value in (overrides or {}).items():
        if value is not None:
            if key in _KEY_DATA_NAMES:
                for name in _KEY_DATA_NAMES:
                    opts.pop(name, None)
            opts[key] = _text(value)


def _mask_secrets(opts: Mapping[str, str]) -> None:
    """Register the password and an inline private key with the task-log masker."""
    from airflow.sdk.log import mask_secret

    for name in ("password", *_KEY_DATA_NAMES):
        if opts.get(name):
            mask_secret(opts[name])


# Option names a shared connection may carry for logical backups or restores; a base backup ignores them.
_LOGICAL_ONLY = frozenset({"database", "databases", "exclude_databases", "compress", "schema_only", "data_only",
                           "clean", "recreate", "no_globals", "no_owner", "exit_on_error", "ignore_globals_errors",
                           "tables", "schemas", "jobs", "fingerprint"})


@dataclass(frozen=True)
class HookOptions(Generic[Opts]):
    """Validated options and the AWS connection that signs their IAM tokens (``aws_conn_id``, None: boto3's
    credential chain), returned together so a password source is never built from another connection's state."""

    options: Opts
    aws_conn_id: str | None = None


def password_source(opts: LogicalSourceOptions | RestoreOptions, aws_conn_id: str | None) -> PasswordSource | None:
    """For IAM (``postgres+aws``) options: a source of fresh tokens, each masked in task logs, signed with the
    credentials of ``aws_conn_id`` when given; else None (the static password in ``opts`` is used). The region is
    resolved here (:func:`..pg.iam.resolve_region`): call it before opening the store so its errors come first."""
    if not opts.conn.iam:
        return None
    from airflow.sdk.log import mask_secret

    conn, session = opts.conn, None
    if aws_conn_id:  # the session is made for the region the tokens are signed for
        conn = replace(conn, region=resolve_region(conn.region, conn.host))
        session = _aws_base_hook(aws_conn_id).get_session(region_name=conn.region)
    return IamTokenSource(conn, session=session, on_token=mask_secret)


class PgPlakarPostgresHook(BaseHook):
    """Builds validated source/destination options for our PostgreSQL tools."""

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "PostgreSQL (pgplakar)"

    def __init__(self, postgres_conn_id: str | None = default_conn_name, *, location: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id
        self.location = location

    def _location_and_options(self, overrides: Mapping[str, Any] | None, *,
                              restore: bool) -> tuple[str, dict[str, str], str | None]:
        """The location, the ``key=value`` options and the connection's ``aws_conn_id`` (None without one)."""
        from airflow.sdk.log import mask_secret

        opts: dict[str, str] = {}
        scheme = LOGICAL
        aws_conn_id = None
        if self.location:
            location = self.location
        else:
            if not self.postgres_conn_id:
                raise ValueError("give postgres_conn_id or location")
            conn = self.get_connection(self.postgres_conn_id)
            extra = dict(conn.extra_dejson or {})
            if conn.host:
                opts["host"] = conn.host
            if conn.port:
                opts["port"] = str(conn.port)
            if conn.login:
                opts["username"] = conn.login
            if _truthy(extra.pop("iam", False)):
                scheme = AWS
                aws_conn_id = self._iam_extras(extra)
                if conn.password:
                    raise OptionError("password", f"connection {self.postgres_conn_id!r} has \"iam\": true, so it "
                                                  "authenticates with an IAM token; remove its password")
            elif conn.password:
                mask_secret(conn.password)
                opts["password"] = conn.password
            if conn.schema:
                opts["database"] = conn.schema
            for src, dst in _SSL_EXTRAS.items():
                if extra.get(src) not in (None, ""):
                    opts[dst] = _text(extra.pop(src))
            for key, value in extra.items():
                if key not in _IGNORED_EXTRAS and value not in (None, ""):
                    opts[key] = _text(value)
            if "ssl_key_data" in opts:
                log.warning("connection %r: Airflow shows the extra ssl_key_data in clear (UI, REST API); rename it "
                            "%s, which it masks", self.postgres_conn_id, SSL_KEY_DATA_ALIAS)
            if scheme == AWS and extra.get("region_name") not in (None, ""):
                opts["region"] = _text(extra["region_name"])
            location = f"{scheme}://"
        _override(opts, overrides)
        if aws_conn_id and not opts.get("region"):
            region = _aws_base_hook(aws_conn_id).region_name  # the AWS connection's region_name, if any
            if region:
                opts["region"] = region
        _mask_secrets(opts)
        if restore and "database" in opts and opts.get("recreate") in TRUE_WORDS:
            opts.pop("database")  # a connection's default database is no restore target with recreate
        return location, opts, aws_conn_id

    @staticmethod
    def _iam_extras(extra: dict[str, Any]) -> str | None:
        """Check an IAM connection's extras; return its ``aws_conn_id`` (None: boto3's credential chain)."""
        if _truthy(extra.get("redshift")) or _truthy(extra.get("redshift-serverless")):
            raise OptionError("iam", "Redshift IAM credentials are not supported (only RDS and Aurora PostgreSQL)")
        aws_conn_id = extra.get("aws_conn_id")
        if aws_conn_id in (None, ""):
            return None
        _aws_base_hook(str(aws_conn_id))  # fail now, before any store work, if the Amazon provider is missing
        return str(aws_conn_id)

    def source_options(self, overrides: Mapping[str, Any] | None = None) -> HookOptions[LogicalSourceOptions]:
        """A logical backup's source options (``overrides`` win) with the connection's ``aws_conn_id``."""
        location, opts, aws_conn_id = self._location_and_options(overrides, restore=False)
        parsed = parse_source_options(location, opts)
        if not isinstance(parsed, LogicalSourceOptions):
            raise ValueError("this operator takes a logical source (postgres://), not postgres+bin://")
        return HookOptions(parsed, aws_conn_id)

    def restore_options(self, overrides: Mapping[str, Any] | None = None) -> HookOptions[RestoreOptions]:
        """A logical restore's destination options (``overrides`` win) with the connection's ``aws_conn_id``."""
        location, opts, aws_conn_id = self._location_and_options(overrides, restore=True)
        return HookOptions(parse_restore_options(location, opts), aws_conn_id)

    def physical_source_options(self, overrides: Mapping[str, Any] | None = None,
                                log: Any = None) -> PhysicalSourceOptions:
        """:class:`PhysicalSourceOptions` from the hook's connection or location, then ``overrides`` (which win)."""
        location, opts, _ = self._location_and_options(None, restore=False)  # IAM is refused below
        scheme = parse_location(location).scheme
        if scheme == AWS:
            raise OptionError("iam", "a base backup needs a replication connection, which RDS/Aurora do not allow: "
                                     "use a logical backup for IAM connections")
        if scheme == LOGICAL:
            location = PHYSICAL + location[location.index("://"):]
        if not self.location:
            dropped = sorted(k for k in opts if k in _LOGICAL_ONLY)
            for key in dropped:
                opts.pop(key)
            if dropped and log is not None:
                log.info("base backup of the whole cluster: ignoring the connection's %s", ", ".join(dropped))
        _override(opts, overrides)
        _mask_secrets(opts)
        return parse_source_options(location, opts)  # type: ignore[return-value]
