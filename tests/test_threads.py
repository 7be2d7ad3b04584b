import pytest
import torch

from fsad_pipeline import threads


def test_cgroup_limits_are_read(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(v2=v2) == 1.5
    v2.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(v2=v2) is None
    quota, period = tmp_path / "q", tmp_path / "p"
    quota.write_text("-1"), period.write_text("100000")
    assert threads.cgroup_cpu_limit(v2=tmp_path / "absent", v1=(quota, period)) is None
    quota.write_text("300000")
    assert threads.cgroup_cpu_limit(v2=tmp_path / "absent", v1=(quota, period)) == 3.0


def test_available_cpus_is_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cpus() == 4


def test_configure_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "available_cpus", lambda: 1)
        assert threads.configure_torch_threads("auto") == 1 and torch.get_num_threads() == 1
        assert threads.configure_torch_threads(2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            threads.configure_torch_threads(0)
    finally:
        torch.set_num_threads(before)


def test_the_hook_applies_the_threads_parameter(monkeypatch):
    from types import SimpleNamespace

    from fsad_pipeline.hooks import TorchThreadsHooks

    before = torch.get_num_threads()
    try:
        TorchThreadsHooks().after_context_created(SimpleNamespace(params={"threads": 1}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
