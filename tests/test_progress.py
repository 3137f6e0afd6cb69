"""Job logs say `step k/N` with elapsed time and an ETA from this process's own pace."""
from ctpo.progress import Progress, format_seconds


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 5.4, 73, 3725, 7200)] == ["0s", "5s", "1m13s", "1h02m05s", "2h00m00s"]


def test_step_line_elapsed_and_eta_from_this_process():
    clock = FakeClock()
    p = Progress(10, clock=clock)
    clock.t += 30.0
    assert p.line(1) == "step 1/10 elapsed 30s eta 4m30s"  # 9 steps left at 30 s each
    clock.t += 30.0
    assert p.line(2) == "step 2/10 elapsed 1m00s eta 4m00s"
    clock.t += 60.0
    assert p.line(10) == "step 10/10 elapsed 2m00s eta 0s"


def test_resumed_job_counts_only_its_own_steps():
    clock = FakeClock()
    p = Progress(300, start=100, clock=clock)  # resumed at step 100
    assert p.line(100) == "step 100/300 elapsed 0s eta ?"
    clock.t += 120.0
    assert p.line(102) == "step 102/300 elapsed 2m00s eta 3h18m00s"  # 60 s per step x 198 left
