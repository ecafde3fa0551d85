"""Persistence service: stores the event stream in LMDB segments.

Arrives with the persistence issue; nothing here yet writes to disk.
"""
