"""The one exception ingest raises for bad input (a file, a topic, an option the user can fix)."""

from __future__ import annotations


class IngestError(ValueError):
    """Bad input to ingest: the message names the file and the problem. `lapa data` prints it as one line."""


class IncompleteEpisode(IngestError):
    """An episode bag that is still being recorded (or was interrupted): skipped with a warning, never ingested."""
