"""Filling caches ahead of traffic: warm jobs and pins, prefetch along
``calls``, the tenants' references in the origin.
"""
