"""The `plexus` command line: the operator's face of the platform (floor 5: imports every role)."""
