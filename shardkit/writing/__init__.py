"""The write path: ``ShardWriter``, the ordered process pool, the write driver with its
resume record, merge, the Dask engine and the indexer.

(Named ``writing`` because ``shardkit.write`` is the function users call.)
"""
