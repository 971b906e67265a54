"""The ``cachesvc`` command line. Holds no service logic."""
