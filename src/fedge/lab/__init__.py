"""``fedge lab``: rehearse a real edge fleet on one Linux machine.

A lab puts each device's real agent in a Podman container (native or emulated
arm64) inside its own network namespace, behind a shaped and lossy veth link
to a bridge where the real coordinator listens, injects faults, and writes a
report. Modules:

* :mod:`fedge.lab.host`: the host resources (bridge, namespaces, veths, qdiscs,
  iptables rules, tmpfs mounts), the state file that records them and teardown.
* :mod:`fedge.lab.prereqs`: what the lab needs on the host, and the message that
  says what is missing.

Nothing is imported here, so ``import fedge.lab`` stays cheap.
"""
