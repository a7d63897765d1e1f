"""torch_ref.TorchFlow against Apple's PyTorch TarFlow / STARFlow outputs (../shared/reference, ≤ 1e-4).

The reference state dicts load into TorchFlow directly (our config comes from the importer), so the
oracle is the official implementations' own forward, loss and sequential samples.
"""

import numpy as np
import pytest
import torch

from starflow2_jax import convert, flow
from starflow2_jax.torch_ref import TorchFlow, torch_flow_from_variables

TOL = 1e-4


def _model(fixture, layout, channels):
    sd = {k[3:]: v for k, v in fixture.items() if k.startswith("sd/")}
    config, variables = convert.import_torch_flow(sd, layout=layout, in_channels=channels)
    model = TorchFlow(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                                strict=False)
    assert not missing, missing
    assert all(k.endswith(("attn_mask", "freqs_cos", "freqs_sin")) for k in unexpected), unexpected
    return config, variables, model.eval()


def _close(actual, expected, what):
    err = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def _tokens(config, nchw):
    return torch.from_numpy(np.asarray(flow.patchify(config, np.asarray(nchw).transpose(0, 2, 3, 1))))


def _images(config, tokens):
    return np.asarray(flow.unpatchify(config, tokens.numpy())).transpose(0, 3, 1, 2)


def test_tarflow_forward_loss_and_samples(tarflow_fixture):
    f = tarflow_fixture
    config, _, model = _model(f, "apple-tarflow", 3)
    labels = torch.from_numpy(np.asarray(f["y"]))
    with torch.no_grad():
        z, _, _ = model(_tokens(config, f["x"]), labels)
        loss = model.loss(_tokens(config, f["x"]), labels)
    _close(z, f["z"], "z")  # TarFlow's forward returns token-layout z
    _close(loss, f["loss"], "loss")
    noise = torch.from_numpy(np.asarray(f["noise"]))
    _close(_images(config, model.sample_tokens(noise, labels)), f["samples_cfg0"], "samples_cfg0")
    _close(_images(config, model.sample_tokens(noise, None)), f["samples_uncond"], "samples_uncond")


def test_starflow_forward_and_sequential_samples(starflow_fixture):
    f = starflow_fixture
    config, _, model = _model(f, "apple-starflow", 4)
    text = torch.from_numpy(np.asarray(f["y_cond"]))
    with torch.no_grad():
        z, logdets, outputs = model(_tokens(config, f["x"]), None, text)
    _close(_images(config, z), f["z"], "z")
    for j, out in enumerate(outputs):
        _close(out.numpy().reshape(f[f"outputs/{j}"].shape), f[f"outputs/{j}"], f"outputs/{j}")
    for k, block in enumerate(config.blocks):  # the reference keeps −log σ in permuted order
        _close(np.asarray(flow.permute(logdets[k].numpy(), block.permutation)), f[f"logdets/{k}"], f"logdets/{k}")
    samples = model.sample_tokens(_tokens(config, f["noise"]), None, text)
    _close(_images(config, samples), f["samples/seq_cfg0"], "samples/seq_cfg0")


def test_from_variables_rejects_a_foreign_layout(tarflow_fixture):
    sd = {k[3:]: v for k, v in tarflow_fixture.items() if k.startswith("sd/")}
    config, variables = convert.import_torch_flow(sd, layout="apple-tarflow", in_channels=3)
    assert isinstance(torch_flow_from_variables(config, variables), TorchFlow)
    with pytest.raises((ValueError, RuntimeError), match="apple-starflow"):
        torch_flow_from_variables(config, variables, layout="apple-starflow")
