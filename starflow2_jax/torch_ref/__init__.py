"""PyTorch runtimes of our models, written in the references' straightforward style (modules, a
KV-cache loop), for side-by-side benchmarks and as independent oracles. They load the references'
checkpoint layouts (``convert``), so any state dict ``export_torch_flow`` writes runs here too."""

from starflow2_jax.torch_ref.flow import TorchFlow, torch_flow_from_variables

__all__ = ["TorchFlow", "torch_flow_from_variables"]
