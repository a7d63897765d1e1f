"""Damaged and missing dataset directories are named with the config field, before any record is read."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_collections
import pytest

from starflow2_jax.data.check import DatasetError, check_dataset_dir

TRAIN_FILE = "starflow2_digits-train.array_record-00000-of-00001"


@pytest.fixture
def digits_copy(digits_builder, tmp_path):
    """A private copy of the prepared digits: ``tmp/tfds/starflow2_digits/1.0.0`` (tests damage it)."""
    version = tmp_path / "tfds" / "starflow2_digits" / "1.0.0"
    shutil.copytree(digits_builder.data_dir, version)
    return version


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_an_intact_dataset_passes(digits_copy):
    check_dataset_dir(digits_copy)
    check_dataset_dir(digits_copy, splits=["test"])


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_array_record_file_is_named(digits_copy, keep):
    _truncate(digits_copy / TRAIN_FILE, keep)
    check_dataset_dir(digits_copy, splits=["test"])  # the other split's file is intact
    with pytest.raises(ValueError, match=rf"^data\.data_dir='{digits_copy}': file {TRAIN_FILE} of split 'train' "
                                         r"is damaged \(truncated or corrupt: .*\); prepare the dataset again"):
        check_dataset_dir(digits_copy)


def test_missing_and_empty_directories(digits_copy, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "empty", r"data\.data_dir='.*empty': no dataset_info\.json \(the directory is empty\); expected"),
        (tmp_path / "absent", r"data\.data_dir='.*absent': does not exist; expected a prepared TFDS dataset"),
        (tmp_path / "tfds", r"no dataset_info\.json \(the directory holds \['starflow2_digits'\]\).*did you mean "
                            rf"'{digits_copy}'\?"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            check_dataset_dir(path)


def test_missing_shard_corrupt_metadata_and_unknown_split(digits_copy):
    with pytest.raises(ValueError, match=r"the dataset has no split 'validation'; it has \['test', 'train'\]"):
        check_dataset_dir(digits_copy, splits=["validation"])
    (digits_copy / TRAIN_FILE).unlink()
    with pytest.raises(ValueError, match=rf"file {TRAIN_FILE} of split 'train' is missing \(dataset_info\.json lists "
                                         r"it with 1500 records\)"):
        check_dataset_dir(digits_copy, field="eval.data_dir")
    (digits_copy / "dataset_info.json").write_text('{"name": "starflow2_digits", "splits": [')
    with pytest.raises(ValueError, match=r"^eval\.data_dir='.*': .*dataset_info\.json is unreadable or corrupt"):
        check_dataset_dir(digits_copy, field="eval.data_dir")


def test_training_inputs_name_the_config_field(digits_copy, tmp_path):
    from starflow2_jax.train.inputs import make_source

    _truncate(digits_copy / TRAIN_FILE)
    directory = ml_collections.ConfigDict({"data": {"builder": "directory", "data_dir": str(digits_copy)}})
    with pytest.raises(ValueError, match=rf"^data\.data_dir='{digits_copy}': file {TRAIN_FILE} .* is damaged"):
        make_source(directory, "train", tmp_path / "workdir")
    assert len(make_source(directory, "test", tmp_path / "workdir")) == 297  # the intact split still reads
    digits = ml_collections.ConfigDict({"data": {"builder": "digits", "data_dir": str(tmp_path / "tfds")}})
    with pytest.raises(ValueError, match=rf"^data\.data_dir='{tmp_path / 'tfds'}' \({digits_copy}\): file "
                                         rf"{TRAIN_FILE} of split 'train' is damaged"):
        make_source(digits, "train", tmp_path / "workdir")
    (tmp_path / "empty").mkdir()
    empty = ml_collections.ConfigDict({"data": {"builder": "directory", "data_dir": str(tmp_path / "empty")}})
    with pytest.raises(ValueError, match=r"^data\.data_dir='.*empty': no dataset_info\.json \(the directory is empty"):
        make_source(empty, "train", tmp_path / "workdir")


def test_a_flipped_byte_is_named_when_its_record_is_read(digits_copy, tmp_path):
    """The footer is intact, so the static check passes; reading the damaged chunk names file and record."""
    from starflow2_jax.data import ImagePreprocess, make_pipeline
    from starflow2_jax.train.inputs import make_source

    path = digits_copy / TRAIN_FILE
    data = bytearray(path.read_bytes())
    data[100_000:100_008] = bytes(b ^ 0xFF for b in data[100_000:100_008])  # inside a chunk of records
    path.write_bytes(bytes(data))
    check_dataset_dir(digits_copy)
    config = ml_collections.ConfigDict({"data": {"builder": "directory", "data_dir": str(digits_copy)}})
    source = make_source(config, "train", tmp_path / "workdir")
    assert len(source) == 1500 and source[0]["image"].shape == (8, 8, 1)
    pipeline = make_pipeline(source, batch_size=100, seed=0, shuffle=False, preprocess=ImagePreprocess(levels=16),
                             num_epochs=1, process_index=0, process_count=1)
    with pytest.raises(DatasetError, match=rf"^data\.data_dir='{digits_copy}': record \d+ of split 'train' \(file "
                                           rf"{TRAIN_FILE}\) cannot be read \(RuntimeError: .*Riegeli"):
        list(pipeline)


def test_evaluation_keeps_the_damaged_file_message(digits_copy, tmp_path):
    """``eval``'s split lookup rewrites errors that mention the split as "no such split"; not a damaged file."""
    from starflow2_jax.eval.scoring import split_source

    _truncate(digits_copy / TRAIN_FILE)
    restored = type("Restored", (), {})()
    restored.config = ml_collections.ConfigDict({"data": {"builder": "directory", "data_dir": str(digits_copy)}})
    with pytest.raises(DatasetError, match=rf"file {TRAIN_FILE} of split 'train' is damaged"):
        split_source(restored, "train", tmp_path / "workdir")
    with pytest.raises(ValueError, match=r"--split 'validation': .* has no such split"):
        split_source(restored, "validation", tmp_path / "workdir")
