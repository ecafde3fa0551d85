"""Small apps the end-to-end tests launch through `plexus run`."""
