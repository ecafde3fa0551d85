"""Persistence service (floor 4): the event stream into LMDB segments and durable state,
history and replay out of them, and the restore a recovering broker is sent."""
