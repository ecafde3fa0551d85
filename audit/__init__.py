"""Audit service: hash-chained, signed audit log (arrives with the audit issue)."""
