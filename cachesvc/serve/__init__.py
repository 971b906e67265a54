"""Answering HTTP: one package response (headers, ranges, conditionals,
pacing), the hit fast path, what agent and peer share, readiness, the
operator routes, running until a signal, finding a service by name.

Decides nothing about bytes: what to serve comes from the read path.
"""
