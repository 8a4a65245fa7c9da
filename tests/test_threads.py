"""The CPU thread policy of edit.py and train.py (factedit.threads)."""

from __future__ import annotations

import pytest
import torch

from factedit.threads import choose_threads, set_threads


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(
    "cores, load, expected",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 5.0, 1), (16, 4.4, 12), (16, 0.0, 16), (1, 0.0, 1)],
)
def test_auto_leaves_the_cores_other_processes_use(cores, load, expected):
    threads, why = choose_threads("auto", cores=cores, load=load)
    assert threads == expected and why.startswith("auto")


def test_an_explicit_number_or_the_environment_wins(monkeypatch):
    assert choose_threads("3", cores=2, load=5.0) == (3, "--threads")
    assert choose_threads(1, cores=16, load=0.0) == (1, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto", cores=16, load=0.0) == (1, "OMP_NUM_THREADS")
    assert choose_threads("4", cores=16, load=0.0)[0] == 4


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="--threads"):
        choose_threads(bad)


def test_set_threads_applies_it():
    before = torch.get_num_threads()
    try:
        assert set_threads("1") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
