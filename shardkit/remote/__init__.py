"""Remote backends for :mod:`shardkit.source`: HTTP(S), S3, pipe:, fsspec."""
