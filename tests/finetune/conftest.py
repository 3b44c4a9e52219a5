import pytest
import torch

from tests.reference.tiny import build_reference, save_reference

from .tiny_data import write_turn_tokenizer


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """name -> (reference model, checkpoint folder with a turn-aware tokenizer); built once per session."""
    made = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            ref = build_reference(name, seed=7, scale=0.1)
            folder = save_reference(ref, tmp_path_factory.mktemp(f"ft-{name}"))
            write_turn_tokenizer(folder)
            made[name] = (ref, folder)
        return made[name]

    return get
