from __future__ import annotations

import os

import pytest
from hypothesis import settings

from cluster import Cluster, ProcessCluster

# `make test` (and CI) replays the same examples every run, so a red run is reproducible and never a
# dice roll; PCCL_HYPOTHESIS_PROFILE=explore draws new examples (run it when changing a parser).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("PCCL_HYPOTHESIS_PROFILE", "ci"))


def _closing(kind):
    """A fixture body: yields ``make(**config)``, which builds ``kind(**config)``; closes them all after the test."""
    made = []

    def make(**config):
        c = kind(**config)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def cluster_factory():
    """Peer processes around an in-process master (``tests/cluster.Cluster``)."""
    yield from _closing(Cluster)


@pytest.fixture
def process_cluster():
    """Peer processes and master processes (``tests/cluster.ProcessCluster``), for killing the master."""
    yield from _closing(ProcessCluster)
