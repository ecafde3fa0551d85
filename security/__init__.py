"""Security leaves of Plexus: credentials (and, later, the key ring). Imports nothing of ours."""
