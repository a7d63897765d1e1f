"""Checkpoint conversion: Apple's PyTorch TarFlow / STARFlow state dicts and Hugging Face Qwen2.5-VL and
DINOv2 checkpoints ↔ our Flax variables."""

from starflow2_jax.convert.hf_dinov2 import export_hf_dinov2, load_hf_dinov2
from starflow2_jax.convert.hf_qwen import export_hf_qwen2_5_vl, load_hf_qwen2_5_vl
from starflow2_jax.convert.state_dict import load_state_dict, save_state_dict
from starflow2_jax.convert.torch_flow import LAYOUTS, export_torch_flow, import_torch_flow

__all__ = ["LAYOUTS", "export_hf_dinov2", "export_hf_qwen2_5_vl", "export_torch_flow", "import_torch_flow",
           "load_hf_dinov2", "load_hf_qwen2_5_vl", "load_state_dict", "save_state_dict"]
