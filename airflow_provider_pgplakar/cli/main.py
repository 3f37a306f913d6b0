"""``pgplakar [options] at STORE COMMAND ...`` — Plakar's verbs on our store. The entry point: parse (:mod:`.parser`),
run the command's handler (:mod:`.commands`), turn every failure into one line and an exit status.

Exit status: 0 on success, 1 on any failure (one line on stderr, no traceback unless ``--debug``), 2 on usage
errors, 3 when ``check`` finds problems, ``verify`` fails or ``freshness`` finds a stale source, 130 on Ctrl-C, 143
when cancelled by SIGTERM (running tools are stopped, nothing further starts and a backup commits nothing:
:func:`..pg.process.cancel`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..pg import PgError
from ..pg.process import TaskCancelled, cancel, cancellable
from ..store.errors import StoreError
from .commands import run
from .parser import UsageError, build_parser, command_names, split_at


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pgplakar argv`` (default: this process's command line) and return its exit status."""
    if argv is None:  # the process is this command and ends when it returns
        try:
            return _main(sys.argv[1:])
        finally:
            # exit without a last garbage collection over every imported module's objects (~30 ms of each run's
            # fixed cost with psycopg loaded); objects are still finalised, files and connections are closed already
            gc.freeze()
    return _main(argv)


def _main(argv: Sequence[str]) -> int:
    debug = "--debug" in argv
    try:
        parser = build_parser()
        location, rest = split_at(argv, command_names(parser))
        args = parser.parse_args(rest)
        if not args.command:
            raise UsageError("no command given (try --help)")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="pgplakar: %(message)s", stream=sys.stderr)
        _progress_output(args)
        with cancellable(), _sigterm_cancels(), _progress_sink_restored():
            return run(location, args)
    except UsageError as e:
        print(f"pgplakar: usage: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("pgplakar: interrupted", file=sys.stderr)
        return 130
    except TaskCancelled as e:
        print(f"pgplakar: error: {_one_line(e)}", file=sys.stderr)
        return 143
    except (StoreError, PgError, ValueError, OSError) as e:
        if debug:
            raise
        print(f"pgplakar: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if debug:
            raise
        print(f"pgplakar: error: internal error {type(e).__name__}: {_one_line(e)} (rerun with --debug)",
              file=sys.stderr)
        return 1


@contextmanager
def _sigterm_cancels() -> Iterator[None]:
    """SIGTERM (``kill``, a container stop, systemd) cancels the command: tools are killed, nothing else starts."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _progress_sink_restored() -> Iterator[None]:
    """``main()`` may run in-process (tests, embedding): progress goes back to the log when it returns."""
    from ..store import progress

    try:
        yield
    finally:
        progress.set_sink(None)


def _progress_output(args: argparse.Namespace) -> None:
    """Progress of long work: JSON lines with ``--json``, a redrawn bar on a terminal, log lines with ``-v``."""
    from ..store import progress
    from .output import progress_bar, progress_json

    if args.json:
        progress.set_sink(progress_json)
    elif sys.stderr.isatty():
        progress.set_sink(progress_bar, every=1.0)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
