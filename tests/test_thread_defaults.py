"""The thread settings a command picks where the environment says nothing, and that the environment wins."""

import os
import types

import pytest

from picogpt_lightning import cli

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


@pytest.fixture
def clean_environment(monkeypatch):
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "sys", types.SimpleNamespace(modules={}))  # as before torch is loaded
    return monkeypatch


@pytest.mark.parametrize("idle, threads, policy", [(0, "1", "PASSIVE"), (1, "1", "PASSIVE"), (2, "2", None), (3, "3", None), (16, "4", None)])
def test_idle_cores_decide_the_count_and_one_thread_sleeps_while_it_waits(clean_environment, idle, threads, policy):
    clean_environment.setattr(cli, "idle_cores", lambda: idle)
    cli.set_thread_defaults()
    assert os.environ["OMP_NUM_THREADS"] == threads
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    assert "GOMP_SPINCOUNT" not in os.environ  # idle workers spin for libgomp's default count


@pytest.mark.parametrize("given", [{"OMP_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}])
def test_the_users_environment_wins(clean_environment, given):
    for name, value in given.items():
        clean_environment.setenv(name, value)
    clean_environment.setattr(cli, "idle_cores", lambda: 0)
    cli.set_thread_defaults()
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == {
        name: given.get(name) for name in THREAD_VARIABLES
    }


def test_a_wait_policy_the_user_set_is_kept_with_one_thread(clean_environment):
    clean_environment.setenv("OMP_WAIT_POLICY", "ACTIVE")
    clean_environment.setattr(cli, "idle_cores", lambda: 0)
    cli.set_thread_defaults()
    assert (os.environ["OMP_NUM_THREADS"], os.environ["OMP_WAIT_POLICY"]) == ("1", "ACTIVE")


def test_idle_cores_counts_from_proc_stat(monkeypatch):
    """Two readings of /proc/stat's cpu line: 2 cores, 30 of 100 jiffies busy -> 1.4 idle -> 1."""
    readings = iter(["cpu 100 0 100 700 100 0 0 0 0 0\n", "cpu 120 0 110 760 110 0 0 0 0 0\n"])

    class Stat:
        def __init__(self, *args):
            self.line = next(readings)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def readline(self):
            return self.line

    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr("builtins.open", Stat)
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    assert cli.idle_cores() == 1  # busy = 2 * 30/100 = 0.6 cores: 1.4 idle, rounded
