"""The Python client of the Plexus bus; see `clients.bus`."""
