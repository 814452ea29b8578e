"""Remote backends for :mod:`shardkit.storage.dispatch`: HTTP(S), S3, pipe:, fsspec."""
