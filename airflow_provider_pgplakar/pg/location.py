"""A PostgreSQL location URI split into its parts: ``postgres://[user[:password]@]host[:port][/database]`` (also
``postgresql://``), ``postgres+aws://`` (an IAM token instead of a password) and ``postgres+bin://`` (physical, the
whole cluster). :mod:`.options` merges the parts with ``key=value`` options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from . import REDACTED, OptionError

__all__ = ["AWS", "LOGICAL", "PHYSICAL", "SCHEMES", "SCHEME_RE", "ParsedLocation", "parse_location"]

LOGICAL = "postgres"
AWS = "postgres+aws"
PHYSICAL = "postgres+bin"
SCHEMES = {
    "postgres": LOGICAL,
    "postgresql": LOGICAL,
    "postgres+aws": AWS,
    "postgresql+aws": AWS,
    "postgres+bin": PHYSICAL,
    "postgresql+bin": PHYSICAL,
}

# A URI's scheme (RFC 3986): what any location starts with, ours or not (a store's s3://, a typo).
SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class ParsedLocation:
    """The parts of a location URI; None where the URI says nothing. ``has_password`` is True even for ``u:@h``."""

    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    has_password: bool = False
    database: str | None = None

    def __repr__(self) -> str:
        pw = REDACTED if self.has_password else None
        return (
            f"ParsedLocation(scheme={self.scheme!r}, host={self.host!r}, port={self.port!r}, "
            f"username={self.username!r}, password={pw!r}, database={self.database!r})"
        )


_URI_HINT = "expected postgres://[user[:password]@]host[:port][/database]"
_ENCODE_HINT = "percent-encode '@', ':', '/', '?', '#' and '%' in the user name and password"


def _decode(part: str, what: str) -> str:
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise OptionError("location", f"invalid percent-encoding in the {what}") from None


def _split_hostport(hostport: str) -> tuple[str | None, int | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise OptionError("location", "unterminated '[' in an IPv6 host")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise OptionError("location", "unexpected text after an IPv6 host")
        port_text = rest[1:] if rest else ""
    else:
        if hostport.count(":") > 1:
            raise OptionError("location", "IPv6 hosts must be written in brackets, e.g. postgres://[::1]:5432/")
        host, _, port_text = hostport.partition(":")
    port = None
    if port_text:
        # The value is not echoed: a badly encoded password could land here.
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise OptionError("location", f"port must be a number between 1 and 65535 ({_ENCODE_HINT})")
        port = int(port_text)
    return (_decode(host, "host") or None), port


def parse_location(location: str) -> ParsedLocation:
    """Split a location URI into its parts, percent-decoding user, password, host and database.

    Query strings and fragments are refused: the reference silently ignored ``?sslmode=require``, which would turn
    a security setting into a no-op. Error messages never quote the user-info part.
    """
    if not isinstance(location, str) or not location:
        raise OptionError("location", f"is required ({_URI_HINT})")
    match = SCHEME_RE.match(location)
    if not match:
        raise OptionError("location", _URI_HINT)
    scheme = SCHEMES.get(match.group(1).lower())
    if scheme is None:
        accepted = ", ".join(f"{s}://" for s in SCHEMES)
        raise OptionError("location", f"unsupported scheme {match.group(1)!r} (accepted: {accepted})")
    rest = location[match.end():]
    end = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if pos >= 0:
            end = min(end, pos)
    authority, tail = rest[:end], rest[end:]
    if "?" in tail or "#" in tail:
        raise OptionError(
            "location", f"query strings and fragments are not supported; use options such as ssl_mode= ({_ENCODE_HINT})"
        )
    userinfo, at, hostport = authority.rpartition("@")
    username = password = None
    has_password = False
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = _decode(user_text, "user name") or None
        has_password = bool(colon)
        password = _decode(password_text, "password") if colon else None
    host, port = _split_hostport(hostport)
    database = None
    if tail not in ("", "/"):
        path = tail[1:]
        if "/" in path:
            raise OptionError("location", "the path must be a single database name (write '/' in a name as %2F)")
        database = _decode(path, "database name")
    return ParsedLocation(scheme, host, port, username, password or None, has_password, database)
