"""How many torch threads a run takes on a busy machine: /proc/stat parsing and the decision, on fake samples."""
from __future__ import annotations

import pytest
import torch

from groupdistil import runtime
from groupdistil.runtime import Busy, CpuSample, busy_cores, free_threads, parse_proc_stat

# user nice system idle iowait irq softirq steal guest guest_nice (jiffies), 2 cores
STAT_0 = """cpu  1000 0 200 8000 100 0 10 0 0 0
cpu0 500 0 100 4000 50 0 5 0 0 0
cpu1 500 0 100 4000 50 0 5 0 0 0
intr 1393097 0 0
ctxt 123
"""


def stat(user: int, system: int, idle: int, iowait: int) -> str:
    """STAT_0's layout with the given aggregate counters."""
    return STAT_0.replace("cpu  1000 0 200 8000 100 0 10 0", f"cpu  {user} 0 {system} {idle} {iowait} 0 10 0")


def test_parse_proc_stat_reads_the_aggregate_line_and_counts_cores() -> None:
    s = parse_proc_stat(STAT_0)
    assert s == CpuSample(total=1000 + 200 + 8000 + 100 + 10, idle=8000 + 100, cores=2)


@pytest.mark.parametrize("text", ["", "intr 1 2 3\n", "cpu  1 2 x 4 5 6 7 8\ncpu0 1 2 3 4\n", "cpu 1 2\n"])
def test_parse_proc_stat_refuses_what_it_cannot_read(text: str) -> None:
    assert parse_proc_stat(text) is None


@pytest.mark.parametrize("after, busy", [
    (stat(1000, 200, 8050, 150), 0.0),  # 100 jiffies passed, all idle or waiting for I/O
    (stat(1050, 200, 8050, 100), 1.0),  # half of the time busy on 2 cores: one core
    (stat(1080, 20 + 200, 8000, 100), 2.0),  # all busy
    (stat(1025, 200, 8075, 100), 0.5),
])
def test_busy_cores_between_two_samples(after: str, busy: float) -> None:
    assert busy_cores(parse_proc_stat(STAT_0), parse_proc_stat(after)) == pytest.approx(busy)


def test_busy_cores_is_zero_when_no_time_passed() -> None:
    s = parse_proc_stat(STAT_0)
    assert busy_cores(s, s) == 0.0


@pytest.mark.parametrize("busy, cores, threads", [(0.0, 2, 2), (0.4, 2, 2), (0.5, 2, 2), (0.6, 2, 1), (1.0, 2, 1),
                                                  (2.0, 2, 1), (5.0, 2, 1), (3.2, 8, 5)])
def test_free_threads(busy: float, cores: int, threads: int) -> None:
    assert free_threads(busy, cores) == threads


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch):
    """Two cores, torch's default 2 threads, /proc/stat answered from a list of texts; torch's state restored."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "_default_threads", lambda: 2)
    monkeypatch.setattr(runtime, "BUSY_INTERVAL", 0.0)

    def answer(texts: list[str | None]) -> None:
        it = iter(texts)
        monkeypatch.setattr(runtime, "read_proc_stat", lambda path="/proc/stat": (
            None if (t := next(it)) is None else parse_proc_stat(t)))

    yield answer
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1], warn_only=before[2])


TRAIN = {"device": "cpu", "num_threads": 0}


def test_an_idle_machine_keeps_every_core(fake_machine, capsys: pytest.CaptureFixture) -> None:
    fake_machine([STAT_0, stat(1000, 200, 8050, 150)])  # just after a job ended: the load average would say ~1
    runtime.setup_process(TRAIN)
    assert torch.get_num_threads() == 2 and "busy" not in capsys.readouterr().err
    state = runtime.machine_state(0.9)
    assert state["busy_cores_at_start"] == 0.0 and state["busy_measured_by"] == "/proc/stat"


def test_one_busy_core_leaves_one_thread_with_a_note(fake_machine, capsys: pytest.CaptureFixture) -> None:
    fake_machine([STAT_0, stat(1050, 200, 8050, 100)])
    runtime.setup_process(TRAIN)
    assert torch.get_num_threads() == 1
    assert capsys.readouterr().err.startswith(
        "note: the machine is busy (1.0 of 2 cores in use by other processes): using 1 torch thread(s) instead of 2")
    assert runtime.machine_state()["busy_cores_at_start"] == 1.0


def test_threads_come_back_when_the_machine_is_idle_again(fake_machine) -> None:
    fake_machine([STAT_0, stat(1050, 200, 8050, 100), STAT_0, stat(1000, 200, 8050, 150)])
    runtime.setup_process(TRAIN)  # e.g. the teacher of a comparison, while something else ran
    assert torch.get_num_threads() == 1
    runtime.setup_process(TRAIN)  # its students, in the same process
    assert torch.get_num_threads() == 2


def test_without_proc_stat_the_load_average_decides(fake_machine, monkeypatch, capsys) -> None:
    fake_machine([None])  # macOS
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.3, 1.0, 0.5))
    assert runtime.measure_busy() == Busy(1.3, "load average")
    fake_machine([None])
    runtime.setup_process(TRAIN)
    assert torch.get_num_threads() == 1 and "(load 1.3 on 2 cores)" in capsys.readouterr().err


def test_threads_from_the_config_are_not_measured(fake_machine) -> None:
    fake_machine([])  # reading /proc/stat would fail the test (StopIteration)
    runtime.setup_process({"device": "cpu", "num_threads": 1})
    assert torch.get_num_threads() == 1 and runtime.machine_state()["busy_cores_at_start"] is None
