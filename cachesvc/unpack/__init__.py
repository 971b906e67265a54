"""From package to code tree: compression layers, the confined worker
processes, extraction of tars and zips, the tree writer and its name rules.

Never runs or imports what it unpacks.
"""
