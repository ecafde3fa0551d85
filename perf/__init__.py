"""Benchmarks for Plexus, kept apart from the product code.

Nothing in the product imports from here; the harness only needs pyzmq and the
standard library, and each compared system's client library is imported lazily
by its adapter so a missing one makes that system "unavailable" instead of
breaking the run. See perf/README.md.
"""
