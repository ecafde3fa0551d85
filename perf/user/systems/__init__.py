"""Adapters of the user benchmark (the contract is perf/systems/__init__.py's).

They live outside perf/systems/ so that the routing benchmark's default list of systems
stays as it was; the harness loads them by full module path (`perf.systems.load_adapter`).
"""
