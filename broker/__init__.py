"""The Plexus broker: one ROUTER socket that authenticates apps and routes their messages.

The decisions live in pure modules (`codec`, `topics`, `permissions`, `router`) that tests
drive without sockets; `server` owns the sockets and the poll loop; `__main__` only reads
configuration and starts the server.
"""
