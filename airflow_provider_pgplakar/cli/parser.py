"""What the command line means: the argument parser of ``pgplakar [options] at STORE COMMAND ...``, ``at STORE``,
and the key=value, label and duration arguments. No handler lives here (they are in :mod:`.commands`), so both the
handlers and the entry point (:mod:`.main`) import this module and nothing imports back.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..store.retention import DEFAULT_GROUP_BY, DURATION_HELP, Duration
from ..store.retention import parse_duration as retention_duration

DEFAULT_STORE = os.path.join(os.path.expanduser("~"), ".pgplakar")


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _options_line(cls: type, skip: frozenset[str] = frozenset({"conn"})) -> str:
    """``name [default], ...`` for one option dataclass: the help lists what the parser accepts, always current."""
    import dataclasses

    parts = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        default = f.metadata.get("help_default", default)
        if isinstance(default, bool):
            default = str(default).lower()
        parts.append(f"{f.name} [{default}]" if default not in (None, (), "") else f.name)
    return ", ".join(parts)


def _wrap(title: str, text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100, initial_indent=f"  {title}: ", subsequent_indent="      ")


def _source_options_help() -> str:
    from ..pg.options import ConnOptions, LogicalSourceOptions, PhysicalSourceOptions

    return "\n".join([
        "PostgreSQL source options (key=value; [default]; meanings in the README's option tables):",
        _wrap("postgres://, postgres+aws://", _options_line(LogicalSourceOptions)),
        _wrap("postgres+bin://", _options_line(PhysicalSourceOptions)),
        _wrap("connection, every scheme", _options_line(ConnOptions, frozenset({"iam", "region"}))
              + "; region (postgres+aws); the password is best given in $PGPASSWORD"),
    ])


def _restore_options_help() -> str:
    from ..pg.options import ConnOptions, RestoreOptions

    return "\n".join([
        "Restore into a server (-to postgres://...; key=value; [default]; meanings in the README):",
        _wrap("restore", _options_line(RestoreOptions)),
        _wrap("connection", _options_line(ConnOptions, frozenset({"iam", "region"}))),
        "A directory target restores files; a physical snapshot becomes a data directory (see the flags above).",
    ])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE (else "
                   "$PGPLAKAR_PASSPHRASE, else a prompt on a terminal)")
    p.add_argument("--key-file", metavar="FILE", help="raw store key (from `key export`) instead of a passphrase; "
                   "also $PGPLAKAR_KEY")
    p.add_argument("--cache-dir", metavar="DIR", help="local index cache (default $PGPLAKAR_CACHE_DIR or "
                   "~/.cache/pgplakar)")
    p.add_argument("-v", "--verbose", action="store_true", help="progress and details on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``pgplakar: usage: ...`` line (via UsageError), not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _common(common)
    # the same options after the command must not reset ones given before it: no defaults at that level
    sub_common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    _common(sub_common)
    parser = _Parser(
        prog="pgplakar", parents=[common], usage="pgplakar [options] at STORE COMMAND [ARGS]",
        description="Encrypted, deduplicated snapshots. Usage: pgplakar at STORE COMMAND (STORE: a directory, "
                    "file:// URL or s3://bucket/prefix; default ~/.pgplakar or $PGPLAKAR_STORE).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[sub_common], description=help,
                              prog=f"pgplakar [options] at STORE {name}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = cmd("create", "create a new store (encrypted unless --plaintext)")
    p.add_argument("--plaintext", action="store_true", help="no encryption (integrity checks remain)")
    p.add_argument("--compression-level", type=int, default=1, help="zstd level 0..19 (0 = off; default 1)")

    p = cmd("backup", "back up a local directory or file, or PostgreSQL (postgres://... [key=value ...])")
    p.epilog = _source_options_help()
    p.add_argument("path", help="directory, file, or postgres:// | postgres+aws:// | postgres+bin:// location")
    p.add_argument("pg_options", nargs="*", metavar="key=value",
                   help="PostgreSQL source options, listed below with their defaults")
    p.add_argument("--tag", action="append", default=[], help="snapshot tag (repeatable)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="snapshot label (repeatable)")
    p.add_argument("--idempotency-key", help="retries with the same key end with one snapshot")

    p = cmd("ls", "list snapshots, or the records of SNAPSHOT[:/path]")
    p.add_argument("target", nargs="?")
    p.add_argument("--tag", help="only snapshots with this tag")
    p.add_argument("--verified", action="store_true", help="only snapshots a verify proved (or failed): the latest "
                   "verify report of each")

    p = cmd("verify", "restore a logical snapshot into a throwaway server and compare it with its fingerprints")
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument("verify_options", nargs="*", metavar="key=value",
                   help="before or after SNAPSHOT: databases=a,b | amcheck=true | pg_bin_dir=DIR (the verify "
                        "server's binaries) | target=postgres://user@host:port (a scratch server instead; password "
                        "from $PGPASSWORD)")
    p.add_argument("--no-store", action="store_true", help="do not store the report as a verifies=<id> snapshot")

    p = cmd("cat", "write a record's content to stdout")
    p.add_argument("target", metavar="SNAPSHOT:/path")

    p = cmd("restore", "restore SNAPSHOT[:/path] into a directory, a physical snapshot as a data directory, or a "
                       "logical snapshot into a server")
    p.add_argument("-to", "--to", dest="to", required=True, metavar="DIR|postgres://...")
    p.add_argument("items", nargs="+", metavar="[key=value ...] SNAPSHOT[:/path]",
                   help="the snapshot, and destination options (postgres:// only, listed below with their defaults) "
                        "before or after it")
    p.epilog = _restore_options_help()
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="replace existing files (a physical snapshot: empty a non-empty data or tablespace "
                        "directory first)")
    p.add_argument("-T", "--tablespace-mapping", action="append", default=[], metavar="OLD=NEW",
                   help="physical snapshots: restore the tablespace at OLD into NEW (repeatable; \\= escapes =)")
    p.add_argument("--pg-bin-dir", metavar="DIR", help="physical snapshots: PostgreSQL bin directory that will "
                   "start the data directory (its major version is checked first; its pg_verifybackup is used)")
    p.add_argument("--no-verify", action="store_true", help="physical snapshots: skip pg_verifybackup")
    p.add_argument("--require-verify", action="store_true", help="physical snapshots: fail when no pg_verifybackup "
                   "of the backup's major is available (checked before writing) or it cannot run, instead of a warning")
    p.add_argument("--owner", metavar="USER[:GROUP]", help="physical snapshots restored as root: give every file "
                   "this owner (default: the snapshot's owner names, e.g. postgres)")
    p.add_argument("--no-sync", action="store_true", help="do not fsync restored files and directories (faster; "
                   "a crash soon after may lose them)")
    p.add_argument("--no-clean", action="store_true", help="physical snapshots: keep what a failed or cancelled "
                   "restore wrote, for debugging (default: remove it, as pg_basebackup; a kept directory is "
                   "incomplete and must not be started)")

    p = cmd("check", "verify the store's metadata (and with --read-data every byte)")
    p.add_argument("--read-data", action="store_true")
    p.add_argument("--read-data-subset", metavar="n/m|/m|x%", help="read only some packs: slice n of m, today's "
                   "slice of m (a daily check reads everything within m days), or x%% at random")

    p = cmd("forget", "remove snapshots by ID or by a retention policy")
    p.add_argument("ids", nargs="*", metavar="SNAPSHOT")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N", help=f"keep N {rule} snapshots (-1: all)")
    p.add_argument("--keep-within", metavar="DURATION", help="keep everything within DURATION of the group's newest "
                   "snapshot, restic's units: y, m (months), w, d, h, e.g. 6m, 1y6m, 7d12h")
    p.add_argument("--keep-tag", action="append", default=[], help="keep snapshots with this tag")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY),
                   help="source (default: kind, host, port, database or data directory) | labels | tags | "
                        "label:NAME, comma-separated | '' for one group")
    p.add_argument("--tz", default="UTC", help="time zone of calendar buckets (default UTC)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--prune", action="store_true", help="prune afterwards")

    p = cmd("prune", "delete data no snapshot references (runs beside backups; fails if a restore or check runs, "
                     "unless --wait)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait this long for running restores or checks (backups never make prune wait)")

    p = cmd("stats", "per source the newest snapshot, its age and sizes; the store's totals and dedup ratio")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY), help="what a source is (as for forget)")

    p = cmd("freshness", "exit 3 naming every source whose newest snapshot is older than --max-age")
    p.add_argument("--max-age", required=True, metavar="DURATION", help="e.g. 26h, 2d, 1w (y, m months, w, d, h)")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY), help="what a source is (as for forget)")

    p = cmd("info", "show the store's settings, or a snapshot's header")
    p.add_argument("target", nargs="?", metavar="SNAPSHOT")

    p = cmd("key", "manage passphrases (key files)")
    p.add_argument("action", choices=["list", "add", "remove", "passwd", "export"])
    p.add_argument("key_id", nargs="?")
    p.add_argument("--new-passphrase-file", metavar="FILE", help="the new passphrase for add/passwd (else "
                   "$PGPLAKAR_NEW_PASSPHRASE, else a prompt)")

    p = cmd("repair", "rebuild the index from pack headers")
    p.add_argument("what", choices=["index"])
    return parser


def command_names(parser: argparse.ArgumentParser) -> frozenset[str]:
    """The commands ``parser`` (from :func:`build_parser`) accepts, read from its sub-parsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return frozenset(action.choices)
    return frozenset()


def split_at(argv: Sequence[str], commands: frozenset[str]) -> tuple[str, list[str]]:
    """``at STORE`` may appear first or after global options; a store named without ``at`` before one of
    ``commands`` is explained."""
    args = list(argv)
    skip = False
    for i, a in enumerate(args):
        if skip:  # the value of a global option such as --passphrase-file FILE
            skip = False
            continue
        if a == "at":
            if i + 1 >= len(args):
                raise UsageError("`at` needs a store location")
            return args[i + 1], args[:i] + args[i + 2 :]
        if not a.startswith("-"):
            if a not in commands and i + 1 < len(args) and args[i + 1] in commands:
                raise UsageError(f"{a!r} is not a command; to name a store write `pgplakar at {a} {args[i + 1]} …`")
            break
        skip = a in ("--passphrase-file", "--key-file", "--cache-dir")
    return os.environ.get("PGPLAKAR_STORE", DEFAULT_STORE), args


def parse_duration(text: str) -> Duration:
    """``--keep-within`` in restic's units (``6m`` is six months); see store/retention.py."""
    try:
        return retention_duration(text)
    except ValueError as e:
        raise UsageError(f"--keep-within: {text!r} is not a duration ({DURATION_HELP})") from e


def parse_kv(items: list[str], what: str = "option") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"{what} wants key=value, got {item.split('=')[0]!r}")
        out[k] = v
    return out


def parse_labels(items: list[str]) -> dict[str, str]:
    return parse_kv(items, "--label")
