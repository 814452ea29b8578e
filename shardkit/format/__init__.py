"""The shard format, bytes only: tar both ways, compression, samples, index and manifest.

Nothing here opens a file or a URL; callers hand in streams and bytes.
"""
