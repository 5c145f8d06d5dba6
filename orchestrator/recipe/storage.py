"""Which `checkpoint.storage` values name a remote filesystem (no pyarrow needed to tell).

The recipe validates the scheme with these; :mod:`orchestrator.engine.remote` mirrors
checkpoints to such a URI.
"""

from __future__ import annotations

# URI schemes pyarrow.fs.FileSystem.from_uri understands (without a network call to check).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def is_remote(storage: str) -> bool:
    """True when ``storage`` is a URI for a pyarrow filesystem rather than a local path."""
    scheme, sep, _ = storage.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES
