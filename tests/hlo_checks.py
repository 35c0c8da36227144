"""Checks on compiled HLO text shared by the tests."""

import re


def collective_groups(hlo: str) -> list[str]:
    """The replica_groups of every collective in a compiled module's text."""
    return re.findall(r"replica_groups=(\{[^=]*?\}\})", hlo)


def single_device_collectives(hlo: str) -> list[str]:
    """Groups of collectives whose every group is one device: a collective
    over a size-1 mesh axis, which XLA:CPU still runs (a rendezvous of all
    devices plus copies of the operands)."""
    return [g for g in collective_groups(hlo) if re.fullmatch(r"\{(\{\d+\},?)+\}", g)]
