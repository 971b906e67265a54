"""The publisher's side: uploads and references, repacking and compression
layers. Runs on the publisher's machine, never in a service.
"""
