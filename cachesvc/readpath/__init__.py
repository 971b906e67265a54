"""The read-through walk, once: local store, running fill, sources in order;
flights (one fill per digest, followers, the held-back last byte).

Never parses HTTP or picks status codes.
"""
