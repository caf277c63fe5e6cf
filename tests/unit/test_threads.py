"""CPU budget: affinity and cgroup quota, not the host's core count; the intra-op thread choice."""

import torch

from wsss.engine import threads


def test_budget_is_the_smaller_of_affinity_and_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # 150 ms per 100 ms period
    assert threads.cpu_budget() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.cpu_budget() == 6
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3})
    assert threads.cpu_budget() == 1


def test_cgroup_v2_quota_is_read(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    real = threads.Path
    monkeypatch.setattr(threads, "Path", lambda p: cpu_max if p == "/sys/fs/cgroup/cpu.max" else real(p))
    cpu_max.write_text("250000 100000\n")
    assert threads._cgroup_quota() == 2.5
    cpu_max.write_text("max 100000\n")
    assert threads._cgroup_quota() is None


def test_threads_explicit_then_env_then_budget(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "cpu_budget", lambda: 3)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.configure_threads(0) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.configure_threads(0) == 1 and torch.get_num_threads() == 1
        assert threads.configure_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_host_is_warned_about_only_when_the_threads_would_not_fit(monkeypatch):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.2, 1.0, 1.0))  # one other busy process
    msg = threads.busy_host_warning(2, budget=2)
    assert msg is not None and "--train.threads 1" in msg and "load average 1.2 on 2 CPUs" in msg
    assert threads.busy_host_warning(1, budget=2) is None  # one thread fits beside it
    assert threads.busy_host_warning(2, budget=4) is None  # 4 CPUs: two are free
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.2, 2.0, 2.0))  # 1.8 of 4 CPUs free: suggest 2, not 1
    assert "--train.threads 2" in threads.busy_host_warning(4, budget=4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.1, 0.1))  # quiet
    assert threads.busy_host_warning(2, budget=2) is None
