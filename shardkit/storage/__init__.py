"""Where bytes come from: the backend vocabulary, local files, the cache, URL dispatch, remote backends.

Dependencies point one way: backends know only ``backend``; the cache fetches through a
backend's plain stream; ``dispatch`` is the one place that picks a backend and the cache.
"""
