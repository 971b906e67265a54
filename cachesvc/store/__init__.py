"""The content-addressed disk store: reservations, commit of verified ingests,
LRU, pins, recovery, re-hashing and the scrub, with diskcache as the index.

Knows nothing of HTTP, peers or origins; never called back by what it commits.
"""
