"""Chaos campaigns against pccl: real peer processes, seeded faults, invariants checked on every record.

``python -m chaos run --scenario mix --peers 4 --duration 60 --seed 1`` (see ``docs/chaos.md``).
Modules: ``schedule`` (pure: seed -> faults), ``invariants`` (pure: records -> verdict),
``workload`` (one peer process), ``campaign`` (the controller), ``netfaults`` (link faults on
namespaces), ``report`` (tables).
"""
