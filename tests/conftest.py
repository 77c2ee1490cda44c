from __future__ import annotations

import pytest

from cluster import Cluster


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
