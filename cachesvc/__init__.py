"""cachesvc: a distributed, tiered, content-addressed cache for serverless code packages.

The subpackages are the rooms of the house, in layers (README.md, "Layout"):
``cli`` over the apps (``node_agent``, ``peer``) over ``serve`` over ``warm``,
``publish``, ``unpack`` over ``readpath`` and ``fanout`` over ``store`` and
``upstream`` over the base modules ``digest``, ``errors``, ``config``,
``metrics``, ``fsutil`` and ``dirlock``. Lower layers never import upper ones.
"""
