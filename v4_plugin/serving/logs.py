"""Log hygiene for the adapters: drop a framework's log line that would misstate what the plugin does."""

from __future__ import annotations

import logging


class MutedLines(logging.Filter):
    """While entered, drops the records of logger `logger_name` whose message (its format string, or the
    formatted text) starts with one of `prefixes`. A filter on the logger itself: it holds whatever
    handlers the framework attaches."""

    def __init__(self, logger_name: str, *prefixes: str):
        super().__init__()
        self.logger, self.prefixes = logging.getLogger(logger_name), prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(self.prefixes) or record.getMessage().startswith(self.prefixes))

    def __enter__(self) -> "MutedLines":
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeFilter(self)
