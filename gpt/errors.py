"""Exceptions of the data pipeline.

Every stage of the pipeline (corpus -> clean -> dedup -> tokenizer -> shards -> loader)
raises `DataError` for problems the *user* can fix: a path that does not exist, a
threshold that filters every document away, a vocabulary size the corpus cannot
support, a shard file that is truncated. The CLI catches `DataError` and prints its
message as one line, so each message names the offending values and says what to change.

`DataError` subclasses `ValueError` so that callers who do not know about it still
catch it as the bad-value error it is; `DataFileNotFoundError` is also a
`FileNotFoundError` so `except FileNotFoundError` keeps working.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the data or with the options given to a pipeline stage."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A path given to the pipeline (or a file it expected to find) does not exist."""
