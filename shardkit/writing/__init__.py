"""The write path. :func:`shardkit.write` (``driver``) is the entry point; ``ShardWriter``
(``writer``) is for hand-written loops; ``dask_engine`` runs parts on a cluster.

- ``inputs``: a path or items -> keyed items for the workers, and their work;
- ``work``: what a worker does with one input (load, the user's fn, the decode check);
- ``pool``: the ordered process pool (results in input order, deaths named);
- ``driver``: the one assembler: part slices, resume, progress, ShardWriter;
- ``resume``: the resume record; ``result``: WriteResult, built from the manifest;
- ``writer``: ShardWriter (size-bounded, deterministic shards, sidecars, manifest);
- ``merge``: ``--part I/N`` outputs joined into one dataset; ``indexer``: sidecars for
  existing tars (``shardkit index``);
- ``companion``: :func:`shardkit.write_companion`, new fields for an existing set in shards
  aligned with it (``companion_base``: the base set it reads; ``companion_table``: the
  table form).

(Named ``writing`` because ``shardkit.write`` is the function users call.)
"""
