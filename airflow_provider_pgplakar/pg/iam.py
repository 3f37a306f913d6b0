"""AWS IAM authentication for RDS and Aurora (``postgres+aws://``): the region, and a fresh token per connection.

The password of a ``postgres+aws`` connection is an RDS IAM auth token: a SigV4-presigned ``rds-db:connect`` URL
that boto3's ``generate_db_auth_token`` builds offline (no network call) from the host, port, user and region and
the AWS credentials. A token is valid for 15 minutes and RDS checks it only when a connection opens, so
:class:`IamTokenSource` makes a new one for every connection and every tool process (pg_dumpall, each pg_dump, the
manifest connections, pg_restore, psql): a long backup never hands out an expired token, and a long-running
pg_dump is unaffected by expiry.

Credentials come from boto3's standard chain (environment variables, the shared credentials/config files and
``AWS_PROFILE``, web identity such as IRSA/EKS, container and instance metadata), or from a given boto3 session (in
Airflow: the one of an AWS connection, ``aws_conn_id``). The boto3 client is made once per source; refreshable
credentials (web identity, metadata) renew themselves when they near expiry.

The region is resolved by :func:`resolve_region` when a token source is made (parsing options never reads the AWS
configuration): the ``region`` option, else the SDK's configured region (``AWS_REGION``, ``AWS_DEFAULT_REGION``,
the profile's ``region``), else the region in an ``*.rds.amazonaws.com`` host name, else an error naming the fix.

Tokens are secrets: they never go into argv (only ``PGPASSWORD`` and psycopg's ``password`` keyword), logs or
exceptions; ``on_token`` lets a caller register each one with a log masker (Airflow's ``mask_secret``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from . import OptionError, PgError
from .options import REGION_RE, ConnOptions

__all__ = [
    "IamAuthError",
    "IamTokenSource",
    "password_source",
    "region_from_host",
    "resolve_region",
    "sdk_region",
]

log = logging.getLogger(__name__)

# mydb.abc123.eu-west-3.rds.amazonaws.com, mycluster.cluster-ro-xyz.us-east-1.rds.amazonaws.com, proxies alike;
# China: mydb.abc123.rds.cn-north-1.amazonaws.com.cn
_RDS_HOST_RE = re.compile(
    rf"\.(?P<region>{REGION_RE.pattern})\.rds\.amazonaws\.com\.?\Z"
    r"|\.rds\.(?P<cn_region>cn-[a-z]+-[0-9]+)\.amazonaws\.com\.cn\.?\Z"
)
_WEAK_SSL = ("allow", "prefer")
NO_CREDENTIALS = (
    "postgres+aws: no AWS credentials found (tried environment variables, the shared credentials and config files, "
    "web identity, container and instance metadata): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, set "
    "AWS_PROFILE to a configured profile, or run with an IAM role (in Airflow: give the connection an aws_conn_id)"
)

PasswordSource = Callable[[], "str | None"]


class IamAuthError(PgError):
    """An IAM token could not be made: no credentials, an unknown profile, STS refused the web identity, ..."""


def _one_line(e: BaseException) -> str:
    return " ".join((str(e) or type(e).__name__).split())


def region_from_host(host: str) -> str | None:
    """The region in an RDS/Aurora endpoint name (``*.<region>.rds.amazonaws.com``), else None."""
    m = _RDS_HOST_RE.search(host.lower())
    return (m.group("region") or m.group("cn_region")) if m else None


def sdk_region() -> tuple[str, str] | None:
    """The region the AWS SDK is configured with, and where it came from; None when there is none.

    ``AWS_REGION`` first (what the other AWS SDKs and the reference tool's docs use; boto3 itself ignores it), then what
    botocore resolves: ``AWS_DEFAULT_REGION``, then ``region`` in the profile (``AWS_PROFILE``, ``AWS_CONFIG_FILE``).
    """
    env = os.environ.get("AWS_REGION", "").strip()
    if env:
        return env, "AWS_REGION"
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        region = botocore.session.Session().get_config_variable("region")
    except BotoCoreError as e:  # e.g. ProfileNotFound: AWS_PROFILE names a profile that is not configured
        raise IamAuthError(f"postgres+aws: cannot read the AWS configuration: {_one_line(e)} (fix AWS_PROFILE or "
                           "AWS_CONFIG_FILE, or give region=)") from None
    if not region or not str(region).strip():
        return None
    where = "AWS_DEFAULT_REGION" if os.environ.get("AWS_DEFAULT_REGION", "").strip() else "the AWS profile"
    return str(region).strip(), where


def resolve_region(region: str | None, host: str) -> str:
    """The region to sign tokens for: ``region`` (the option), else :func:`sdk_region`, else the RDS host name.

    Raises :class:`OptionError` (option ``region``) when none of them gives one, or when the SDK's value is not a
    region name.
    """
    if region:
        return region  # ConnOptions checks that it looks like a region
    found = sdk_region()
    if found is not None:
        value, where = found
        if not REGION_RE.fullmatch(value):
            raise OptionError("region", f"{value!r} from {where} is not an AWS region name (e.g. us-east-1); fix it "
                                        "or give region=")
        log.debug("postgres+aws: region %s from %s", value, where)
        return value
    from_host = region_from_host(host)
    if from_host is not None:
        log.debug("postgres+aws: region %s from the host name %s", from_host, host)
        return from_host
    raise OptionError(
        "region",
        f"postgres+aws needs the AWS region of the instance and none was found (no region= option, no AWS_REGION, "
        f"AWS_DEFAULT_REGION or profile region, and host {host!r} is not an *.rds.amazonaws.com name): give "
        "region=us-east-1 (for example) or set AWS_REGION",
    )


class IamTokenSource:
    """A :data:`PasswordSource` for ``postgres+aws``: each call returns a fresh RDS IAM token.

    :param conn: IAM connection options (``conn.iam``, a username); without ``conn.region`` the region is
        resolved here (:func:`resolve_region`), so an :class:`OptionError` for ``region`` is raised on creation.
    :param session: a ``boto3.session.Session`` to take credentials from; default: a new session, i.e. boto3's
        standard credential chain.
    :param on_token: called with every token made, e.g. Airflow's ``mask_secret``.

    ``count`` is the number of tokens made so far. Failures raise :class:`IamAuthError` with a one-line message and
    no chained exception (nothing from botocore's internals reaches a task log).
    """

    def __init__(self, conn: ConnOptions, *, session: Any = None,
                 on_token: Callable[[str], object] | None = None) -> None:
        if not conn.iam or conn.username is None:
            raise ValueError("IamTokenSource needs postgres+aws connection options (with a username)")
        self.host = conn.host
        self.port = conn.port
        self.username = conn.username
        self.region = resolve_region(conn.region, conn.host)
        self.count = 0
        self._session = session
        self._on_token = on_token
        self._client: Any = None
        if conn.ssl_mode in _WEAK_SSL:
            log.warning("postgres+aws: ssl_mode=%s is weaker than require; RDS IAM authentication needs an encrypted "
                        "connection, so set ssl_mode=require (or verify-full with the RDS CA bundle)", conn.ssl_mode)

    def _rds(self) -> Any:
        if self._client is None:
            import boto3

            session = self._session if self._session is not None else boto3.session.Session()
            self._client = session.client("rds", region_name=self.region)
        return self._client

    def __call__(self) -> str:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            token: str = self._rds().generate_db_auth_token(
                DBHostname=self.host, Port=self.port, DBUsername=self.username, Region=self.region
            )
        except NoCredentialsError:
            raise IamAuthError(NO_CREDENTIALS) from None
        except (BotoCoreError, ClientError) as e:
            raise IamAuthError(f"postgres+aws: cannot make the RDS IAM token for {self.username}@{self.host}:"
                               f"{self.port} in {self.region}: {_one_line(e)}") from None
        self.count += 1
        if self._on_token is not None:
            self._on_token(token)
        return token

    def __repr__(self) -> str:
        return (f"IamTokenSource(host={self.host!r}, port={self.port}, username={self.username!r}, "
                f"region={self.region!r}, tokens={self.count})")


def password_source(conn: ConnOptions, password: PasswordSource | None = None) -> PasswordSource:
    """``password`` if given; else a fresh-token :class:`IamTokenSource` for ``postgres+aws``; else the static
    password of ``conn``."""
    if password is not None:
        return password
    if conn.iam:
        return IamTokenSource(conn)
    return lambda: conn.password
