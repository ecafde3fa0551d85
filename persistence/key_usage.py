"""Which data keys stored records still need: what `plexus keys destroy` asks first.

Every sealed record names its key id in its first five bytes (security.keyring), so the
answer is a read-only pass over the segments' rows and the dead letters in state.mdb,
beside a running service (LMDB readers never block its writer). Unsealed rows, and the
journal (which never holds a sealed record), need no key. A key retired before the pass
cannot gain records during it: the service seals only with the active key, and
`KeyRing.destroy` refuses a key retired within the last few seconds.
"""

from __future__ import annotations

from collections import Counter

import lmdb

from broker.paths import PlatformPaths
from persistence.state import StateStore
from persistence.store import MessageStore
from security.keyring import record_key_id

_PASSES = 3


def key_ids_in_use(paths: PlatformPaths) -> Counter[int]:
    """Sealed records per key id, in the segments and the dead letters of `paths`'s store."""
    for attempt in range(_PASSES):
        try:
            used = _segment_keys(paths)
            break
        except lmdb.Error:  # retention deleted a segment under the pass: count again
            if attempt + 1 == _PASSES:
                raise
    if paths.state_path.exists():
        state = StateStore(paths.state_path, readonly=True)
        try:
            for record in state.dead_letters():
                key_id = _key_of(record.fields.get("sealed"), record.fields.get("payload"))
                if key_id is not None:
                    used[key_id] += 1
        finally:
            state.close()
    return used


def _segment_keys(paths: PlatformPaths) -> Counter[int]:
    used: Counter[int] = Counter()
    store = MessageStore(paths.segments_dir, readonly=True)
    try:
        for message in store.scan(0):
            key_id = _key_of(message.sealed, message.payload)
            if key_id is not None:
                used[key_id] += 1
    finally:
        store.close()
    return used


def _key_of(sealed: object, payload: object) -> int | None:
    if not sealed or not isinstance(payload, bytes):
        return None
    return record_key_id(payload)
