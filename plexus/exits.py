"""Exit codes of the `plexus` command; each means one kind of failure a script can act on."""

from __future__ import annotations

OK = 0
FAILURE = 1
USAGE = 2  # bad arguments (click's own code)
NOT_RUNNING = 3  # no platform runs with this home, or the broker does not answer
PERMISSION = 4  # the manifest does not allow it
AUTH = 5  # credential rejected, or no app with that id (every command that names an app)
BAD_INPUT = 6  # invalid JSON, topic, pattern or config/manifest; an unsafe apps or run dir
TIMEOUT = 7  # a wait ran out: `subscribe --timeout` before --count, `request`, `stop`
STORAGE = 8  # persistence is off, or the store failed (e.g. a record failed its check)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): what was printed before it is complete, the rest not
CLOSED_PIPE = 141  # stdout was closed early (128 + SIGPIPE), e.g. `plexus replay ... | head`
