"""Hosts feeding hosts: the per-digest K-ary tree the owner peer keeps, and
asking for, deciding on and feeding parents.

A parent's bytes are verified like any source's (by the store), never trusted.
"""
