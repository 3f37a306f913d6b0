"""Named pause points for crash tests.

``PGPLAKAR_FAILPOINT=<name>`` makes the process print ``FAILPOINT <name>`` to stderr and sleep when it reaches that
point, so a test can ``kill -9`` it exactly there. Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import sys
import time


def failpoint(name: str, detail: str = "") -> None:
    if os.environ.get("PGPLAKAR_FAILPOINT") != name:
        return
    sys.stderr.write(f"FAILPOINT {name} {detail}\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)
