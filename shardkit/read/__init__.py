"""The read path: URL patterns, the shard reader, the worker loop, the sample pipeline,
the dataset base, ``ShardDataset``, ``Mix`` and ``ShardMap``.
"""
