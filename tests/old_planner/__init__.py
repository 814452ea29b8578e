"""The planner as it was at 0fc6f58 (shardkit/plan/epoch.py and plan/mix.py, verbatim but
for the marked interleave hook in mix.py): the oracle the O(shards) planner is checked
against. It materialises every sample id, so use it on small inputs only."""
