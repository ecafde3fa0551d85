"""`python -m plexus` is the `plexus` command."""

from plexus.cli import main

main()
