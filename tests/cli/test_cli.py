"""The `starflow2` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import starflow2_jax


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "starflow2_jax.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_subcommands():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: starflow2" in result.stdout
    assert "version" in result.stdout


def test_version_prints_json_with_devices():
    result = _run_cli("version")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["starflow2_jax"] == starflow2_jax.__version__
    assert info["jax"].startswith("0.10.")
    assert info["flax"]
    # The subprocess inherits the 8 fake CPU devices that conftest configured.
    assert info["backend"] == "cpu"
    assert len(info["devices"]) == 8
    assert {d["platform"] for d in info["devices"]} == {"cpu"}


def test_unknown_subcommand_fails_naming_it():
    result = _run_cli("no-such-command")
    assert result.returncode != 0
    assert "no-such-command" in result.stderr


def test_no_subcommand_prints_usage_and_fails():
    result = _run_cli()
    assert result.returncode == 2
    assert "usage: starflow2" in result.stderr


def test_console_script_installed_next_to_interpreter():
    script = Path(sys.executable).parent / "starflow2"
    assert script.is_file(), f"{script} missing: install the package with `pip install -e .`"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "version" in result.stdout
