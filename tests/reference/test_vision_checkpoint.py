"""The vision tower loads from a saved multimodal checkpoint by a prefix strip and equals the reference's tower."""
import json

import torch
from safetensors.torch import load_file

from gemma3n.model.vision import build_vision_tower

PREFIX = "model.vision_tower.timm_model."


def vision_weights(folder) -> dict:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update({k[len(PREFIX):]: v for k, v in load_file(shard).items() if k.startswith(PREFIX)})
    return tensors


def test_tower_loads_tiny_multimodal_checkpoint_by_prefix_strip(reference_checkpoint):
    ref, folder = reference_checkpoint("multimodal")
    vision_config = json.loads((folder / "config.json").read_text())["vision_config"]
    assert vision_config["architecture"] == "mobilenetv5_base"  # the small table; the 300M one is in tests/model
    with torch.device("meta"):  # as the runtime's loader builds it
        tower = build_vision_tower(vision_config)
    result = tower.load_state_dict(vision_weights(folder), strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    tower.eval()

    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = ref.model.vision_tower(pixel_values=pixels, do_pooling=False).last_hidden_state  # (N, C, 16, 16)
        got = tower(pixels)
    expected = hidden.flatten(2).transpose(1, 2)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
