"""The node agent's app (L1): its routes over the shared service core of
:mod:`cachesvc.serve`, and the unpack routes. Imports cachesvc; never imported by it.
"""
