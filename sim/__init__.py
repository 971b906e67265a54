"""A discrete-event simulator of the fan-out policy (``python -m sim``).

It answers "how long until every agent of an AZ holds a new package?" for
thousands of hosts, where the emulation (``python -m loadtest fanout``) stops
at a few dozen processes on one machine. Modules:

* :mod:`sim.tracker`: the owner's per-digest tracker (who feeds a newcomer);
* :mod:`sim.engine`: hosts sharing their egress among uploads, chunk by chunk;
* :mod:`sim.model`: one run (origin, owner, agents, an arrival schedule);
* :mod:`sim.report` and :mod:`sim.__main__`: the grid of runs, its table and plot.

Not modelled (so real runs are slower): TCP slow start and congestion, CPU,
disk, packet loss, failures and resumes, ingress limits (a host receives from
one parent, which sends at most its own egress), other traffic on the NICs.
The services never import this package.
"""
