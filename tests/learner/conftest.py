"""Registers the ``gpu`` marker (main has no pytest config yet): GPU-only tests carry
``@pytest.mark.gpu`` and skip themselves without CUDA; ``pytest -m gpu`` selects them."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (and the GPU stack); skipped without")
