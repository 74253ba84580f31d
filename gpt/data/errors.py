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


def build_config(cls, value, what: str):
    """Turn ``None`` / a dict of overrides / an instance into a config dataclass ``cls``.

    Unknown keys are a `DataError` naming the key and the valid ones (a misspelt
    threshold must not be silently ignored). ``what`` names the stage in the message.
    """
    import dataclasses

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise DataError(f"unknown {what} option(s) {unknown}: valid options are {names}")
        return cls(**value)
    raise DataError(f"{what} options must be a dict or {cls.__name__}, got {type(value).__name__}")
