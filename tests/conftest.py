"""Shared fixtures."""
import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Judge tests run with one torch thread: their small forward passes are faster without thread overhead,
    and results do not depend on the machine's core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro():
    """The tiny random LLaVA loaded exactly as the code under test loads it (`load_vlm("micro")`, dtype auto:
    float32 on a CPU), so a fixture never compares one dtype with another by accident."""
    from tu_lib import models

    return models.load_vlm("micro")


@pytest.fixture(scope="module")
def backbone():
    """The organism's frozen SmolLM2-135M backbone (fp32), if it can be built offline here (no timing is asserted:
    a slow machine is not a failure; the first load converts the packaged GGUF into the cache)."""
    from tu_lib.core import TuError
    from tu_lib.models.presets import organism

    try:
        model, tok = organism.load_backbone()
    except TuError as e:
        pytest.skip(f"backbone unavailable: {e}")
    return model, tok
