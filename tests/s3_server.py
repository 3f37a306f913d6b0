"""Pytest plugin: a real HTTP S3 endpoint (moto's standalone server) for the whole session.

The server runs as a subprocess rather than moto's in-process mock, so boto3 goes through real HTTP (headers,
ranged GETs, conditional PUTs, retries) and child processes (CLI, crash tests) reach the same buckets.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote

import pytest

from tests.helpers import need

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_START_TIMEOUT = 30.0

# ``python -m moto.server`` plus two patches:
# - moto checks ``If-None-Match: *`` and then stores the object without a lock, so two concurrent create-only PUTs
#   can both "win" (seen in 2 of 600 races of 8 threads; 0 of 1500 with the lock). Real S3 makes the check atomic;
#   serialising moto's PutObject handler restores that, so race tests exercise our code, not moto's.
# - moto lists and stats its own package directory on every request to route it (~30% of its time per request);
#   caching that list keeps the >1000-object tests fast.
# And a watchdog: if pytest is killed hard (no fixture teardown), the server exits instead of lingering.
_MOTO_LAUNCHER = """
import os, sys, threading, time
def _watch(parent=os.getppid()):
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
import moto.backends
from moto.s3.responses import S3Response
_modules = tuple(moto.backends.list_of_moto_modules())
moto.backends.list_of_moto_modules = lambda: _modules
_lock = threading.Lock()
_put_object = S3Response.put_object
def put_object(self):
    with _lock:
        return _put_object(self)
S3Response.put_object = put_object
from moto.server import main
main(sys.argv[1:])
"""
_logs: dict[int, IO[bytes]] = {}  # server pid -> its stderr log file (closed by stop_moto_server)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's server (patched, see ``_MOTO_LAUNCHER``) on a free 127.0.0.1 port; wait until it answers.

    ``extra_env`` lets a test run a server with other settings (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` so that
    credentials are actually checked) without touching the shared one. The caller must ``stop_moto_server``.
    """
    for _attempt in range(3):  # the port could be taken between probing and binding; retry with another one
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **FAKE_CREDENTIALS, **(extra_env or {})}
        # The server logs every request to stderr: a pipe nobody drains would fill up and hang it, so use a file.
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-c", _MOTO_LAUNCHER, "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2):
                    _logs[proc.pid] = log
                    return proc, url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        stop_moto_server(proc)
        log.seek(0)
        stderr = log.read()
        log.close()
        if b"Address already in use" not in stderr:
            raise RuntimeError(f"moto server did not start on {url}: {stderr.decode(errors='replace')[-2000:]}")
    raise RuntimeError("moto server could not find a free port after 3 attempts")


def stop_moto_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate (then kill) the server we started; never leaves a stray process behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    log = _logs.pop(proc.pid, None)
    if log is not None:
        log.close()


def s3_location(endpoint_url: str, bucket: str, prefix: str = "") -> str:
    """A store location string for ``open_backend`` / the CLI that points at the given endpoint."""
    path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
    return f"s3://{bucket}{path}?endpoint_url={quote(endpoint_url, safe='')}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server shared by the session; fake credentials are exported to os.environ."""
    # moto.server needs the [server] extra (flask, werkzeug); probe without importing moto into the test process.
    have = all(importlib.util.find_spec(m) is not None for m in ("moto", "flask", "flask_cors", "werkzeug"))
    need(have, "moto[server] (pip install 'moto[server]')")
    saved = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)  # child processes (CLI, crash tests) inherit them
    proc, url = start_moto_server()
    try:
        yield url
    finally:
        stop_moto_server(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> tuple[str, str]:
    """A fresh, uniquely named bucket on the session server: ``(endpoint_url, bucket)``."""
    bucket = f"pgplakar-test-{uuid.uuid4().hex[:16]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    return s3_server, bucket


@functools.cache
def s3_client(endpoint_url: str) -> Any:
    """A plain boto3 client on the test server (cached: building one costs ~0.2 s), for setup and inspection."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
