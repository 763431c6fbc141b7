import os

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def rng(request):
    """A fresh random generator per test; the seed is in the test's report when it fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def poisoned():
    """Every output buffer the kernel wrappers allocate (``fastproto.triton.empty_output``) is filled with
    NaN (integers: -7) for the test, so an element a kernel fails to write cannot go unnoticed."""
    from fastproto import triton as triton_pkg

    old = triton_pkg.POISON_OUTPUTS
    triton_pkg.POISON_OUTPUTS = True
    yield
    triton_pkg.POISON_OUTPUTS = old
