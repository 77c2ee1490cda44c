from __future__ import annotations

import os

import pytest
from hypothesis import settings

from cluster import Cluster

# `make test` (and CI) replays the same examples every run, so a red run is reproducible and never a
# dice roll; PCCL_HYPOTHESIS_PROFILE=explore draws new examples (run it when changing a parser).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("PCCL_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def cluster_factory():
    made: list[Cluster] = []

    def make(**config) -> Cluster:
        c = Cluster(**config)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
