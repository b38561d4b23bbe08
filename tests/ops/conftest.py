import pytest

from tests.cluster_fixture import RayCluster


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-node cluster (``head``: 1 CPU, resource ``head``; ``node2``: 1 CPU, resource
    ``node2``) started with ``ray start``; see tests/cluster_fixture.py."""
    cluster = RayCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
