import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real cluster for every test that acts on jobs from outside (tests/ops, test_faults,
    test_scaling, test_exact_resume), started once with ``ray start``: the head (4 CPUs, resource
    ``head``) and ``node2`` (4 CPUs, resource ``node2``); tests may add nodes. See
    tests/cluster_fixture.py."""
    from tests.cluster_fixture import RayCluster

    cluster = RayCluster(head_cpus=4, node_cpus=4).start()
    try:
        yield cluster
    finally:
        cluster.stop()
