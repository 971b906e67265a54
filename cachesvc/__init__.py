"""cachesvc: a distributed, tiered, content-addressed cache for serverless code packages.

One subpackage per concern, in layers; a module imports only from its own
room or a room below it (README "Layout", held by import-linter). cachesvc
never imports ``node_agent``.
"""
