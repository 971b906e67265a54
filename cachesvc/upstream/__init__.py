"""Where bytes come from: the origin (S3, file), the peer and agent client,
the consistent-hash ring and the peer lists that feed it.

Never verifies or keeps bytes: that is the store's.
"""
