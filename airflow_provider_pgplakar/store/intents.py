"""Prune intents: what a running prune is about to delete, so that backups never wait for prune.

A prune that has decided what to delete first writes ``intents/<id>`` (a sealed ``INTN`` object: the packs and
index segments it will delete), waits :data:`SETTLE_S`, re-lists the snapshots, spares whatever a snapshot
committed meanwhile needs, and only then deletes; the intent goes last. Writers never take the prune lease:

- at start, a writer lists the intents; blobs whose only locations are packs in an intent count as absent (stored
  again), so a new snapshot does not come to depend on a pack being deleted;
- before its commit it checks that no pack it deduplicates against is in an intent;
- after its commit it checks again, and also that every such pack still exists; if not, it deletes its own snapshot
  file and fails (a retry stores the data anew).

Why that is enough (docs/format.md, "Prune without blocking writers"): a snapshot committed before the prune re-lists
is seen and spared; one committed after was committed after the intent was written, so its post-commit check sees
the intent (deletion still running) or the missing pack (deletion done).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError, ObjectNotFound
from .objects import open_object, seal_object

if TYPE_CHECKING:
    from .repo import Store

PREFIX = "intents/"
INTENT_MAX_ITEMS = 10_000_000  # bound on what one intent may list (a store of 160 TB of 16 MiB packs)


def env_seconds(name: str, default: float, high: float) -> float:
    """A duration from the environment, bounded to [0, high]; the default when unset or unreadable."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        value = default
    return min(max(value, 0.0), high)


def settle_seconds() -> float:
    """Time between writing an intent and re-listing snapshots, so commits in flight land (default 10 s;
    ``$PGPLAKAR_PRUNE_SETTLE``)."""
    return env_seconds("PGPLAKAR_PRUNE_SETTLE", 10.0, 600.0)


@dataclass(frozen=True)
class Intent:
    id: str
    created: float
    packs: frozenset[str]
    segments: frozenset[str]


def _context(intent_id: str) -> bytes:
    return b"intent:" + intent_id.encode()


def write_intent(store: Store, packs: set[str], segments: set[str]) -> Intent:
    intent = Intent(secrets.token_hex(16), time.time(), frozenset(packs), frozenset(segments))
    payload = {"v": 1, "created": intent.created, "packs": sorted(packs), "segments": sorted(segments)}
    store.backend.put(f"{PREFIX}{intent.id}", seal_object(store.keys, b"INTN", payload, _context(intent.id)))
    return intent


def delete_intent(store: Store, intent: Intent) -> None:
    store.backend.delete(f"{PREFIX}{intent.id}")


def list_intents(store: Store) -> list[Intent]:
    """Every readable intent. An unreadable one is an integrity error: its packs may be half deleted, and a writer
    that ignored it could depend on them."""
    out = []
    for obj in store.backend.list(PREFIX):
        intent_id = obj.key.rsplit("/", 1)[-1]
        try:
            data = store.backend.get(obj.key)
        except ObjectNotFound:
            continue  # finished meanwhile
        payload = open_object(store.keys, b"INTN", data, obj.key, _context(intent_id))
        out.append(_parse(obj.key, intent_id, payload))
    return out


def _parse(name: str, intent_id: str, payload: Any) -> Intent:
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise IntegrityError(f"{name}: not a version-1 intent")
    packs, segments = payload.get("packs"), payload.get("segments")
    if not (isinstance(packs, list) and isinstance(segments, list)) or len(packs) + len(segments) > INTENT_MAX_ITEMS \
            or not all(isinstance(x, str) and _is_hex_id(x) for x in [*packs, *segments]):
        raise IntegrityError(f"{name}: malformed pack or segment list")
    created = payload.get("created")
    if not isinstance(created, (int, float)):
        raise IntegrityError(f"{name}: malformed creation time")
    return Intent(intent_id, float(created), frozenset(packs), frozenset(segments))


def _is_hex_id(text: str) -> bool:
    return 0 < len(text) <= 128 and not text.strip("0123456789abcdef")


def doomed_packs(store: Store) -> set[str]:
    """The packs some running (or crashed) prune intends to delete."""
    out: set[str] = set()
    for intent in list_intents(store):
        out |= intent.packs
    return out
