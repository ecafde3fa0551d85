"""What persistence answers on the wire when a stored record does not open.

The key ring (security/, floor 1) knows nothing of wire codes; this one function maps its
record errors to the storage codes of docs/protocol.md §13 (the mapping lives here only):

    security.keyring.TamperedRecord  ->  502 STORED_DATA_CORRUPT
    security.keyring.KeyMissing      ->  504 KEY_UNAVAILABLE
"""

from __future__ import annotations

from broker.errors import Code, StorageFailure
from security.keyring import KeyMissing, SealedRecordError


def storage_failure(exc: SealedRecordError) -> StorageFailure:
    """The wire error for a record the key ring could not open (`ref` kept)."""
    code = Code.KEY_UNAVAILABLE if isinstance(exc, KeyMissing) else Code.STORED_DATA_CORRUPT
    return StorageFailure(code, exc.detail, **exc.ref)
