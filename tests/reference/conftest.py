import pytest
import torch

from .tiny import TEXT_CONFIGS, build_reference, save_reference


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """name -> (reference model, folder written by save_pretrained); built once per session."""
    made = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            ref = build_reference(name, seed=sum(map(ord, name)))
            made[name] = (ref, save_reference(ref, tmp_path_factory.mktemp(name)))
        return made[name]

    return get


@pytest.fixture(params=sorted(TEXT_CONFIGS))
def config_name(request):
    return request.param
