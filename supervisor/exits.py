"""Every exit status dlkeeper's programs use, in one place (CONTRACT.md sections 1 and 4)."""

from __future__ import annotations

import signal

OK = 0
FAILURE = 1  # also: `dlkeeper-state check` found problems, `remove` of an unknown id
CONFIG = 2  # a bad config file, flag or environment variable; a usage error
LOCKED = 3  # another daemon holds the state lock
STORAGE_MISSING = 4  # library_path or download_path is not there (a drive not mounted)

INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C of a one-shot command or the demo: 130
TERMINATED = 128 + signal.SIGTERM  # the daemon's second signal while stopping: 143
BROKEN_PIPE = 128 + signal.SIGPIPE  # `dlkeeper watch | head` after the reader left: 141
