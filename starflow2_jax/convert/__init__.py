"""Checkpoint conversion: Apple's PyTorch TarFlow / STARFlow state dicts ↔ our Flax variables."""

from starflow2_jax.convert.state_dict import load_state_dict, save_state_dict
from starflow2_jax.convert.torch_flow import LAYOUTS, export_torch_flow, import_torch_flow

__all__ = ["LAYOUTS", "export_torch_flow", "import_torch_flow", "load_state_dict", "save_state_dict"]
