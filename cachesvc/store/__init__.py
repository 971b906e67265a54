"""The content-addressed disk store: temp, verify, rename, index; LRU, pins,
recovery, re-hashing and the scrub, with diskcache as the index.

Knows nothing of HTTP, peers or origins.
"""
