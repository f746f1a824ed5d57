import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs on the real offline weights (SmolLM2, Whisper); still run in CI")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def offline_cache_dir():
    """Where converted offline weights live; shared across the test session (and across runs) so each
    conversion happens once. Honours LLAMA_AVSR_CACHE like the library does."""
    from modeling_llama_avsr.offline_weights import default_cache_dir

    path = default_cache_dir()
    os.makedirs(path, exist_ok=True)
    return path
