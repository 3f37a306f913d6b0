"""Store exceptions: one class per failure, each message naming the object and the remedy.

Every error a user can hit derives from :class:`StoreError`, so callers (CLI, operators) can turn any of them into a
one-line message without a traceback.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store failure."""


class AlreadyExists(StoreError):
    """A create-only write found the object already present."""


class ObjectNotFound(StoreError):
    """A backend object that must exist is missing."""


class StoreNotFound(StoreError):
    """No store at the location (no ``config`` object)."""


class StoreExistsError(StoreError):
    """``create`` was asked for a location that already holds a store."""


class WrongPassphrase(StoreError):
    """No key file could be unlocked with the given passphrase or key."""


class EncryptionMismatch(StoreError):
    """A plaintext store opened as encrypted, or the reverse."""


class IntegrityError(StoreError):
    """Stored bytes failed verification; wrong bytes are never returned, this is raised instead."""


class SnapshotNotFound(StoreError):
    """No snapshot matches the given ID or prefix."""


class AmbiguousSnapshotId(StoreError):
    """A short ID prefix matches several snapshots."""


class StoreLocked(StoreError):
    """A lease held by another process prevents this operation (prune vs backup)."""


class DependencyMissing(StoreError):
    """A pack that a snapshot about to be committed deduplicates against is missing (or not its indexed size)."""


class LeaseExpired(StoreError):
    """This writer could not refresh its lease in time; committing could race a prune."""
