"""Options of the three source kinds and of the restore destination, parsed and validated up front.

Names, defaults and precedence follow the reference tool (Plakar's PostgreSQL integration): a location URI
(:mod:`.location`), then ``key=value`` options that override the URI parts when present and non-empty.

Where the reference accepts something and fails later or silently, we refuse it here with an :class:`OptionError`
naming the option: unknown keys, URI query strings (:mod:`.location`), a password for IAM,
``clean``+``recreate``, ``data_only``+``clean``, ``database``+``recreate``, half an SSL key pair, and so on.

Validation lives in the dataclasses' ``__post_init__`` so options built directly in Python (for example by an
operator from typed arguments) get the same checks as options parsed from strings. Parsing reads nothing but its
arguments: the AWS region of a ``postgres+aws`` source without a ``region`` option is resolved where its tokens are
made (:func:`.iam.resolve_region`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any, ClassVar
from urllib.parse import quote

from airflow_provider_pgplakar.pg import REDACTED, OptionError

from .location import AWS, LOGICAL, PHYSICAL, ParsedLocation, parse_location

__all__ = [
    "AWS_DEFAULT_EXCLUDES",
    "CHECKPOINT_MODES",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "FINGERPRINT_LEVELS",
    "REGION_RE",
    "SSL_MODES",
    "TRUE_WORDS",
    "ConnOptions",
    "LogicalSourceOptions",
    "FALSE_WORDS",
    "OptionError",
    "PhysicalSourceOptions",
    "RestoreOptions",
    "parse_bool",
    "parse_restore_options",
    "parse_source_options",
]

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 5432
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CHECKPOINT_MODES = ("fast", "spread")
# RDS's internal database: never connectable by customers, so a full postgres+aws backup would fail on it.
AWS_DEFAULT_EXCLUDES: tuple[str, ...] = ("rdsadmin",)
# pg_basebackup --max-rate limits, in kB/s (32 kB/s .. 1024 MB/s).
MAX_RATE_MIN_KB = 32
MAX_RATE_MAX_KB = 1024 * 1024
# Server-side compression of the base-backup stream (BASE_BACKUP's COMPRESSION): method -> accepted levels.
SERVER_COMPRESSION_LEVELS = {"lz4": (1, 12), "zstd": (1, 22)}
SERVER_COMPRESSION_AUTO = "auto"

# Boolean option values (case-insensitive, trimmed).
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})
# Plausible AWS region names: us-east-1, eu-west-3, us-gov-west-1, cn-north-1, us-isob-east-1.
REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]+")
_SSL_PAIRS = (("ssl_cert", "ssl_cert_data"), ("ssl_key", "ssl_key_data"), ("ssl_root_cert", "ssl_root_cert_data"))
# Another name for ``ssl_key_data``: Airflow's secret masker hides values whose key contains ``private_key`` (in the
# UI, the REST API and rendered templates) but shows ``ssl_key_data`` in clear; the Airflow glue uses this name.
SSL_KEY_DATA_ALIAS = "ssl_private_key_data"

# Option names accepted per kind. ``location`` is passed separately.
_CONN_KEYS = frozenset(
    {"host", "port", "username", "password", "pg_bin_dir", "ssl_mode", SSL_KEY_DATA_ALIAS}
    | {k for pair in _SSL_PAIRS for k in pair}
)
_LOGICAL_KEYS = _CONN_KEYS | {"database", "exclude_databases", "compress", "schema_only", "data_only", "fingerprint",
                              "jobs"}
# ``jobs`` of a logical backup: databases dumped at once (each a pg_dump, a server backend and ~10 MiB of read-ahead).
MAX_BACKUP_JOBS = 32
# What a logical backup records to prove a restore later (see :mod:`.fingerprint`): catalog lists only, plus exact
# row counts, plus content digests, sequences and large objects.
FINGERPRINT_LEVELS = ("catalog", "counts", "full")
_PHYSICAL_KEYS = _CONN_KEYS | {"checkpoint", "max_rate", "server_compression"}
_RESTORE_KEYS = _CONN_KEYS | {
    "database",
    "databases",
    "clean",
    "recreate",
    "no_globals",
    "no_owner",
    "schema_only",
    "data_only",
    "exit_on_error",
    "ignore_globals_errors",
    "tables",
    "schemas",
    "jobs",
}
_AWS_LOGICAL_KEYS = (_LOGICAL_KEYS - {"password"}) | {"region"}
_AWS_RESTORE_KEYS = (_RESTORE_KEYS - {"password"}) | {"region"}
# Used to say where a misplaced option belongs.
_KINDS: dict[str, frozenset[str]] = {
    "postgres:// source": _LOGICAL_KEYS,
    "postgres+aws:// source": _AWS_LOGICAL_KEYS,
    "postgres+bin:// source": _PHYSICAL_KEYS,
    "postgres:// restore": _RESTORE_KEYS,
    "postgres+aws:// restore": _AWS_RESTORE_KEYS,
}


# --------------------------------------------------------------------------------------------------------------------
# Value checks shared by the dataclasses


def _check_text(option: str, value: object, *, what: str = "value") -> str:
    """A non-empty string without NUL (NUL cannot travel in argv, env or conninfo)."""
    if not isinstance(value, str):
        raise OptionError(option, f"must be a string, got {type(value).__name__}")
    if not value:
        raise OptionError(option, f"empty {what}")
    if "\0" in value:
        raise OptionError(option, f"{what} contains a NUL character")
    return value


def _check_optional_text(option: str, value: object, *, what: str = "value") -> None:
    if value is not None:
        _check_text(option, value, what=what)


def _check_bool(option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(option, f"must be a boolean, got {type(value).__name__}")


def _check_int(option: str, value: object, lo: int, hi: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionError(option, f"must be an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise OptionError(option, f"{value} is out of range (must be {bounds})")


def _names_tuple(option: str, value: object, *, what: str) -> tuple[str, ...]:
    """Normalise an iterable of names to a tuple (frozen dataclasses must not hold lists)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise OptionError(option, f"must be a sequence of {what}s, got {type(value).__name__}")
    names = tuple(value)
    for name in names:
        _check_text(option, name, what=what)
    return names


def _redact(name: str, value: object) -> object:
    if value is None:
        return None
    if name == "password":
        return REDACTED
    if name.endswith("_data"):
        return "<inline PEM>"
    return value


def _repr(obj: Any) -> str:
    body = ", ".join(f"{k}={v!r}" for k, v in obj.redacted().items())
    return f"{type(obj).__name__}({body})"


# --------------------------------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True, kw_only=True, repr=False)
class ConnOptions:
    """How to reach and authenticate to the server; everything here reaches tools via the libpq environment.

    ``iam`` is set exactly for ``postgres+aws``: authentication then uses a fresh IAM token, so a password is
    refused (the reference silently overwrote one) and a username is required. ``region`` is the ``region``
    option, or None: the token source resolves it then (the AWS SDK's configured region, else the region in an
    ``*.rds.amazonaws.com`` host name: :func:`.iam.resolve_region`), so building options never reads the AWS
    configuration.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None
    iam: bool = False
    region: str | None = None
    # None: the default, prefer (require for postgres+aws); the CLI help shows help_default
    ssl_mode: str | None = field(default=None, metadata={"help_default": "prefer; postgres+aws: require"})
    ssl_cert: str | None = None
    ssl_cert_data: str | None = None
    ssl_key: str | None = None
    ssl_key_data: str | None = None
    ssl_root_cert: str | None = None
    ssl_root_cert_data: str | None = None

    def __post_init__(self) -> None:
        _check_text("host", self.host, what="host")
        if "," in self.host:
            raise OptionError("host", "multiple hosts are not supported")
        _check_int("port", self.port, 1, 65535)
        _check_optional_text("username", self.username, what="user name")
        if self.password is not None:
            if not isinstance(self.password, str) or "\0" in self.password:
                raise OptionError("password", "must be a string without NUL characters")
        if self.ssl_mode is None:
            # RDS IAM needs TLS, and on "prefer" an active attacker can downgrade the connection and read the token.
            object.__setattr__(self, "ssl_mode", "require" if self.iam else "prefer")
        if self.ssl_mode not in SSL_MODES:
            raise OptionError("ssl_mode", f"invalid value {self.ssl_mode!r} (accepted: {', '.join(SSL_MODES)})")
        self._check_ssl_files()
        _check_bool("iam", self.iam)
        if self.iam:
            self._check_iam()
        elif self.region is not None:
            raise OptionError("region", "only for postgres+aws (IAM authentication)")

    def _check_ssl_files(self) -> None:
        for path_key, data_key in _SSL_PAIRS:
            path, data = getattr(self, path_key), getattr(self, data_key)
            _check_optional_text(path_key, path, what="path")
            _check_optional_text(data_key, data, what="PEM data")
            if path is not None and data is not None:
                raise OptionError(path_key, f"{path_key} and {data_key} are mutually exclusive")
            # A pasted path or a mangled secret would otherwise surface as an opaque libpq error at connect time.
            if data is not None and "-----BEGIN " not in data:
                raise OptionError(data_key, "does not look like PEM (no '-----BEGIN ' line)")
        has_cert = self.ssl_cert is not None or self.ssl_cert_data is not None
        has_key = self.ssl_key is not None or self.ssl_key_data is not None
        if has_cert and not has_key:
            raise OptionError("ssl_key", "a client certificate needs its private key (ssl_key or ssl_key_data)")
        if has_key and not has_cert:
            raise OptionError("ssl_cert", "a private key needs its client certificate (ssl_cert or ssl_cert_data)")
        has_root = self.ssl_root_cert is not None or self.ssl_root_cert_data is not None
        if self.ssl_mode == "disable" and (has_cert or has_root):
            raise OptionError("ssl_mode", "ssl_mode=disable contradicts the SSL certificates given")

    def _check_iam(self) -> None:
        if self.region is not None:
            region = _check_text("region", self.region, what="region")
            if not REGION_RE.fullmatch(region):
                raise OptionError("region", f"{self.region!r} is not an AWS region name (e.g. us-east-1)")
        if self.username is None:
            raise OptionError("username", "postgres+aws needs the IAM-enabled database user (username)")
        if self.password is not None:
            raise OptionError("password", "postgres+aws authenticates with an IAM token; remove the password")
        if self.ssl_mode == "disable":
            raise OptionError("ssl_mode", "IAM authentication requires SSL; use ssl_mode=require or stronger")

    def redacted(self) -> dict[str, object]:
        """All fields, with the password and inline PEM data masked: safe for logs, errors and XCom."""
        return {f.name: _redact(f.name, getattr(self, f.name)) for f in fields(self)}

    def redacted_uri(self, scheme: str = LOGICAL, database: str | None = None) -> str:
        """``scheme://user@host:port/database`` without the password, for log lines."""
        host = f"[{self.host}]" if ":" in self.host else quote(self.host, safe="")
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        path = f"/{quote(database, safe='')}" if database else ""
        return f"{scheme}://{user}{host}:{self.port}{path}"

    def __repr__(self) -> str:
        return _repr(self)


class _Redactable:
    """Shared ``redacted()``/``__repr__`` for the option classes that embed a :class:`ConnOptions`."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every subclass is a dataclass

    def redacted(self) -> dict[str, object]:
        """All fields with secrets masked (the nested ``conn`` is redacted too)."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.redacted() if isinstance(value, ConnOptions) else value
        return out

    def __repr__(self) -> str:
        # The nested ConnOptions renders itself redacted; no other field holds a secret.
        body = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({body})"


def _check_common(conn: object, pg_bin_dir: object) -> None:
    if not isinstance(conn, ConnOptions):
        raise OptionError("conn", f"must be ConnOptions, got {type(conn).__name__}")
    _check_optional_text("pg_bin_dir", pg_bin_dir, what="path")


def _check_exclusive(schema_only: bool, data_only: bool) -> None:
    _check_bool("schema_only", schema_only)
    _check_bool("data_only", data_only)
    if schema_only and data_only:
        raise OptionError("schema_only", "schema_only and data_only are mutually exclusive")


@dataclass(frozen=True, kw_only=True, repr=False)
class LogicalSourceOptions(_Redactable):
    """``postgres://`` and ``postgres+aws://`` backups: globals plus one ``pg_dump -Fc`` per database.

    ``database`` None means every connectable database minus ``exclude_databases``. ``exclude_databases`` None
    means the scheme's default: ``rdsadmin`` under IAM, nothing otherwise. With a single ``database`` the exclusions
    have no effect (as the reference documents; the reference applied them anyway), except that excluding the very
    database selected is refused as contradictory. ``jobs`` databases are dumped at once into the one snapshot
    (1 to ``MAX_BACKUP_JOBS``; see :mod:`.jobs`).
    """

    conn: ConnOptions
    database: str | None = None
    exclude_databases: tuple[str, ...] | None = None
    compress: bool = False
    schema_only: bool = False
    data_only: bool = False
    pg_bin_dir: str | None = None
    fingerprint: str = "catalog"
    jobs: int = 1

    def __post_init__(self) -> None:
        _check_common(self.conn, self.pg_bin_dir)
        _check_optional_text("database", self.database, what="database name")
        _check_int("jobs", self.jobs, 1, MAX_BACKUP_JOBS)
        if self.fingerprint not in FINGERPRINT_LEVELS:
            raise OptionError("fingerprint", f"invalid value {self.fingerprint!r} "
                                             f"(accepted: {', '.join(FINGERPRINT_LEVELS)})")
        if self.exclude_databases is None:
            excludes = AWS_DEFAULT_EXCLUDES if self.conn.iam else ()
        else:
            excludes = _names_tuple("exclude_databases", self.exclude_databases, what="database name")
        object.__setattr__(self, "exclude_databases", excludes)
        _check_bool("compress", self.compress)
        _check_exclusive(self.schema_only, self.data_only)
        if self.database is not None and any(fnmatchcase(self.database, p) for p in excludes):
            raise OptionError(
                "exclude_databases",
                f"excludes the selected database {self.database!r}; remove it (an empty exclude_databases= "
                "disables the postgres+aws default)",
            )

    @property
    def scheme(self) -> str:
        return AWS if self.conn.iam else LOGICAL


@dataclass(frozen=True, kw_only=True, repr=False)
class PhysicalSourceOptions(_Redactable):
    """``postgres+bin://`` backups: ``pg_basebackup`` of the whole cluster (no database selection).

    ``checkpoint`` defaults to ``spread``, pg_basebackup's own default, so a scheduled backup does not cause an
    I/O spike on the primary; ``fast`` starts streaming sooner. ``max_rate`` is in kB/s (None = unlimited).

    ``server_compression`` compresses the stream on the server (``none``, ``lz4``, ``zstd``, optionally with
    ``:<level>``). The default ``auto`` means lz4 when the server was built with it, else none: measured on
    pgbench scale 50, lz4 made the server spend *less* CPU than sending raw bytes (0.8 vs 1.1 s) and cut our
    receiving side to a tenth of the messages, and it shrinks network traffic ~10x for remote servers.
    """

    conn: ConnOptions
    pg_bin_dir: str | None = None
    checkpoint: str = "spread"
    max_rate: int | None = None
    server_compression: str = SERVER_COMPRESSION_AUTO

    def __post_init__(self) -> None:
        _check_common(self.conn, self.pg_bin_dir)
        if self.conn.iam:
            raise OptionError("location", "postgres+bin does not support IAM (RDS allows no replication connections)")
        if self.checkpoint not in CHECKPOINT_MODES:
            raise OptionError(
                "checkpoint", f"invalid value {self.checkpoint!r} (accepted: {', '.join(CHECKPOINT_MODES)})"
            )
        if self.max_rate is not None:
            _check_int("max_rate", self.max_rate, MAX_RATE_MIN_KB, MAX_RATE_MAX_KB)
        self.compression_request()  # validates

    @property
    def scheme(self) -> str:
        return PHYSICAL

    def compression_request(self) -> tuple[str | None, int | None, bool]:
        """(method or None, level or None, fall back to uncompressed when the server lacks the method)."""
        if self.server_compression == "none":
            return None, None, False
        if self.server_compression == SERVER_COMPRESSION_AUTO:
            return "lz4", None, True
        method, level = parse_server_compression(self.server_compression)
        return method, level, False


def parse_server_compression(value: str) -> tuple[str, int | None]:
    """``lz4``, ``zstd`` or ``<method>:<level>`` as (method, level or None); OptionError naming the option."""
    method, sep, level_text = value.strip().partition(":")
    accepted = ", ".join(["auto", "none", *SERVER_COMPRESSION_LEVELS])
    if method not in SERVER_COMPRESSION_LEVELS:
        raise OptionError("server_compression", f"invalid method {method!r} (accepted: {accepted}, "
                                                "optionally with :<level>)")
    if not sep:
        return method, None
    low, high = SERVER_COMPRESSION_LEVELS[method]
    try:
        level = int(level_text)
    except ValueError:
        raise OptionError("server_compression", f"invalid level {level_text!r} for {method}") from None
    if not low <= level <= high:
        raise OptionError("server_compression", f"{method} level {level} is out of range ({low}..{high})")
    return method, level


@dataclass(frozen=True, kw_only=True, repr=False)
class RestoreOptions(_Redactable):
    """Restore of a logical snapshot into a running server (``postgres://`` or ``postgres+aws://``).

    Contradictions the reference let pg_restore discover (or silently resolved) are refused: ``clean``+``recreate``,
    ``data_only`` with ``clean``/``recreate`` (pg_restore: "-c and -a cannot be used together"), ``database`` with
    ``recreate`` (``--create`` takes the name from the archive, so ``database`` would be ignored), and ``database``
    with several ``databases`` (they would all be poured into one database).
    """

    conn: ConnOptions
    database: str | None = None
    databases: tuple[str, ...] = ()
    clean: bool = False
    recreate: bool = False
    no_globals: bool = False
    no_owner: bool = False
    schema_only: bool = False
    data_only: bool = False
    exit_on_error: bool = False
    ignore_globals_errors: bool = False
    pg_bin_dir: str | None = None
    tables: tuple[str, ...] = ()
    schemas: tuple[str, ...] = ()
    jobs: int = 1

    def __post_init__(self) -> None:
        _check_common(self.conn, self.pg_bin_dir)
        _check_optional_text("database", self.database, what="database name")
        for name, what in (("databases", "database name"), ("tables", "table name"), ("schemas", "schema name")):
            object.__setattr__(self, name, _names_tuple(name, getattr(self, name), what=what))
        for name in ("clean", "recreate", "no_globals", "no_owner", "exit_on_error", "ignore_globals_errors"):
            _check_bool(name, getattr(self, name))
        _check_exclusive(self.schema_only, self.data_only)
        _check_int("jobs", self.jobs, 1, None)
        if self.clean and self.recreate:
            raise OptionError("clean", "clean and recreate are mutually exclusive")
        if self.data_only and (self.clean or self.recreate):
            flag = "clean" if self.clean else "recreate"
            raise OptionError("data_only", f"data_only cannot be combined with {flag} (pg_restore refuses it)")
        if self.database is not None and self.recreate:
            raise OptionError(
                "database", "not used with recreate=true (the name comes from the archive); remove one of them"
            )
        if self.database is not None and len(self.databases) > 1:
            raise OptionError(
                "databases", f"{len(self.databases)} databases would all be restored into {self.database!r}"
            )

    @property
    def scheme(self) -> str:
        return AWS if self.conn.iam else LOGICAL


# --------------------------------------------------------------------------------------------------------------------
# key=value parsing


def parse_bool(key: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise OptionError(key, f"invalid boolean {value!r} (accepted: true/false, 1/0, yes/no)")


def _parse_int(key: str, value: str) -> int:
    text = value.strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise OptionError(key, f"invalid integer {value!r}")
    return int(text)


def _parse_list(value: str) -> tuple[str, ...]:
    """Comma-separated names, trimmed, empties dropped, duplicates removed (order kept)."""
    return tuple(dict.fromkeys(item.strip() for item in value.split(",") if item.strip()))


def _parse_max_rate(value: str) -> int:
    """``max_rate`` as pg_basebackup writes it: kB/s, optionally suffixed ``k`` or ``M``."""
    match = re.fullmatch(r"([0-9]+)([kM]?)", value.strip())
    if not match:
        raise OptionError("max_rate", f"invalid rate {value!r} (kB/s, optionally with suffix k or M, e.g. 100M)")
    return int(match.group(1)) * (1024 if match.group(2) == "M" else 1)


def _check_keys(kind: str, options: Mapping[str, str]) -> dict[str, str]:
    """Refuse unknown or misplaced keys and non-string values; return the options with empty values dropped."""
    if not isinstance(options, Mapping):
        raise OptionError("options", f"must be a mapping of strings, got {type(options).__name__}")
    allowed = _KINDS[kind]
    kept: dict[str, str] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise OptionError(str(key), "option names must be strings")
        if key == "location":
            raise OptionError("location", "pass the location as its own argument, not among the options")
        if key == "password" and kind.startswith("postgres+aws"):
            raise OptionError("password", "postgres+aws authenticates with an IAM token; remove the password")
        if key not in allowed:
            elsewhere = [label for label, keys in _KINDS.items() if key in keys]
            if elsewhere:
                raise OptionError(key, f"not accepted by a {kind} (valid for: {', '.join(elsewhere)})")
            raise OptionError(key, f"unknown option (a {kind} accepts: {', '.join(sorted(allowed))})")
        if not isinstance(value, str):
            raise OptionError(key, f"value must be a string as given on the command line, got {type(value).__name__}")
        # Empty means unset (as in the reference), except exclude_databases where empty disables the aws default.
        if value or key == "exclude_databases":
            kept[key] = value
    return kept


def _conn_from(loc: ParsedLocation, opts: dict[str, str]) -> ConnOptions:
    """Merge URI parts and options (options win) into a validated :class:`ConnOptions`."""
    if loc.scheme == AWS and loc.has_password:
        raise OptionError("location", "postgres+aws authenticates with an IAM token; remove the password")
    port = _parse_int("port", opts["port"]) if "port" in opts else loc.port
    kwargs: dict[str, Any] = {
        "host": opts["host"].strip() if "host" in opts else loc.host or DEFAULT_HOST,
        "port": DEFAULT_PORT if port is None else port,
        "username": opts.get("username", loc.username),
        "password": opts.get("password", loc.password),
        "ssl_mode": opts["ssl_mode"].strip() if "ssl_mode" in opts else None,
        "iam": loc.scheme == AWS,
        "region": opts["region"].strip() if "region" in opts else None,  # None: resolved by the token source
    }
    for pair in _SSL_PAIRS:
        for key in pair:
            kwargs[key] = opts.get(key)
    if SSL_KEY_DATA_ALIAS in opts:
        if "ssl_key_data" in opts:
            raise OptionError(SSL_KEY_DATA_ALIAS, f"{SSL_KEY_DATA_ALIAS} and ssl_key_data are the same option; give "
                                                  f"one ({SSL_KEY_DATA_ALIAS} is the name Airflow masks)")
        kwargs["ssl_key_data"] = opts[SSL_KEY_DATA_ALIAS]
    return ConnOptions(**kwargs)


def parse_source_options(
    location: str, options: Mapping[str, str] | None = None
) -> LogicalSourceOptions | PhysicalSourceOptions:
    """Parse a backup source: the location's scheme picks logical (``postgres``, ``postgres+aws``) or physical."""
    loc = parse_location(location)
    if loc.scheme == PHYSICAL:
        opts = _check_keys("postgres+bin:// source", options or {})
        if loc.database is not None:
            raise OptionError(
                "location",
                f"postgres+bin backs up the whole cluster; remove the database path /{loc.database}",
            )
        return PhysicalSourceOptions(
            conn=_conn_from(loc, opts),
            pg_bin_dir=opts.get("pg_bin_dir"),
            checkpoint=opts.get("checkpoint", "spread").strip(),
            max_rate=_parse_max_rate(opts["max_rate"]) if "max_rate" in opts else None,
            server_compression=opts.get("server_compression", SERVER_COMPRESSION_AUTO).strip().lower(),
        )
    opts = _check_keys(f"{loc.scheme}:// source", options or {})
    return LogicalSourceOptions(
        conn=_conn_from(loc, opts),
        database=opts.get("database", loc.database),
        exclude_databases=_parse_list(opts["exclude_databases"]) if "exclude_databases" in opts else None,
        compress=parse_bool("compress", opts.get("compress", "false")),
        schema_only=parse_bool("schema_only", opts.get("schema_only", "false")),
        data_only=parse_bool("data_only", opts.get("data_only", "false")),
        pg_bin_dir=opts.get("pg_bin_dir"),
        fingerprint=opts.get("fingerprint", "catalog").strip().lower(),
        jobs=_parse_int("jobs", opts["jobs"]) if "jobs" in opts else 1,
    )


def parse_restore_options(location: str, options: Mapping[str, str] | None = None) -> RestoreOptions:
    """Parse a restore destination (``postgres://`` or ``postgres+aws://``)."""
    loc = parse_location(location)
    if loc.scheme == PHYSICAL:
        raise OptionError(
            "location", "postgres+bin snapshots are plain files: restore them with a file destination, not a server"
        )
    opts = _check_keys(f"{loc.scheme}:// restore", options or {})
    flags = {
        name: parse_bool(name, opts.get(name, "false"))
        for name in ("clean", "recreate", "no_globals", "no_owner", "schema_only", "data_only", "exit_on_error",
                     "ignore_globals_errors")
    }
    if flags["recreate"] and loc.database is not None and "database" not in opts:
        raise OptionError(
            "location",
            f"recreate=true takes database names from the archive; remove the database path /{loc.database}",
        )
    return RestoreOptions(
        conn=_conn_from(loc, opts),
        database=opts.get("database", loc.database),
        databases=_parse_list(opts.get("databases", "")),
        tables=_parse_list(opts.get("tables", "")),
        schemas=_parse_list(opts.get("schemas", "")),
        jobs=_parse_int("jobs", opts["jobs"]) if "jobs" in opts else 1,
        pg_bin_dir=opts.get("pg_bin_dir"),
        **flags,
    )
