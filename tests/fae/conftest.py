"""Shared FAE fixtures: the tiny FAE trained once per session through the loop, stage by stage."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = {"ia": 150, "ib": 200, "ii": 100}


def tiny_stage_config(stage: str, data_dir: str, init_from: str = ""):
    """configs/fae.py:tiny,<stage> with the test's step counts and a shared data directory."""
    from starflow2_jax.config_files import load_config

    c = load_config(os.path.join(REPO, "configs", "fae.py") + f":tiny,{stage}")
    c.data.data_dir = data_dir
    c.data.batch_size = 16
    c.train.steps = STEPS[stage]
    c.train.log_every = 50
    c.train.async_checkpoint = False
    c.train.init_from = init_from
    c.model.fae.stats_batches = 4
    return c


@pytest.fixture(scope="session")
def trained_fae(tmp_path_factory):
    """``({'ia', 'ib', 'ii'} → workdir, the stage-ii config, data_dir)``. Tests using it carry
    ``pytest.mark.xdist_group("trained_fae")`` so that one worker trains it once."""
    from starflow2_jax.train.loop import train

    root = tmp_path_factory.mktemp("fae")
    data_dir = os.fspath(root / "tfds")
    workdirs, previous, config = {}, "", None
    for stage in ("ia", "ib", "ii"):
        config = tiny_stage_config(stage, data_dir, previous)
        workdirs[stage] = os.fspath(root / stage)
        train(config, workdirs[stage])
        previous = workdirs[stage]
    return workdirs, config, data_dir
