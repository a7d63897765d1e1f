"""The suite's parallel runs (``launch/local.sh test``: ``pytest -n 2 --dist loadgroup``) send the tests
of one ``xdist_group`` to one worker, so an expensive session fixture shared by a group (the demo chain,
the trained FAE, the demo pipeline) is built once. pytest-xdist tags each item's node id with its group;
pytest 9.2 moved the node id where xdist 3.8 cannot set it and the groups were silently split — both
workers trained every shared fixture (setup.cfg pins pytest below 9.2). Checked on a throwaway suite."""

import subprocess
import sys

GROUPED = '''
import os, pathlib, time, pytest

pytestmark = pytest.mark.xdist_group("shared")


@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    time.sleep(0.05)
    with open(pathlib.Path(__file__).with_name("workers.txt"), "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''
LOOSE = '''
import time, pytest


@pytest.mark.parametrize("i", range(6))
def test_loose(i):
    time.sleep(0.05)
'''


def test_a_group_runs_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_loose.py").write_text(LOOSE)
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p",
                             "no:cacheprovider", "test_grouped.py", "test_loose.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers = (tmp_path / "workers.txt").read_text().split()
    assert len(workers) == 6 and len(set(workers)) == 1, workers
