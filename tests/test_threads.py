"""Threads chosen on purpose (modeconn/contract/threads.py): each process's share of the
usable cores, the overrides, cgroup quotas, passive waiting set before torch loads, and the
same choice in training (CLI, run_jobs workers) and serving (onnxruntime sessions)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeconn.contract import threads
from modeconn.contract.threads import ThreadsError

REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MODECONN_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}


def test_each_process_gets_its_share_of_the_cores() -> None:
    assert threads.threads_per_process(1, {}, cores=8) == 8
    assert threads.threads_per_process(2, {}, cores=8) == 4
    assert threads.threads_per_process(3, {}, cores=8) == 2  # rounded down: never more threads than cores
    assert threads.threads_per_process(16, {}, cores=8) == 1  # at least one
    assert threads.threads_per_process(1, {}) == threads.usable_cores() == min(
        len(os.sched_getaffinity(0)), threads.cgroup_quota_cores() or 10**6)


def test_overrides_win_and_bad_values_name_the_variable() -> None:
    assert threads.threads_per_process(4, {"MODECONN_THREADS": "3", "OMP_NUM_THREADS": "1"}, cores=8) == 3
    assert threads.threads_per_process(4, {"OMP_NUM_THREADS": "5"}, cores=8) == 5
    assert threads.threads_per_process(4, {"MODECONN_THREADS": " "}, cores=8) == 2  # blank: unset
    with pytest.raises(ThreadsError, match=r"^MODECONN_THREADS='two': not an integer"):
        threads.threads_per_process(1, {"MODECONN_THREADS": "two"})
    with pytest.raises(ThreadsError, match=r"^OMP_NUM_THREADS='0': must be at least 1"):
        threads.threads_per_process(1, {"OMP_NUM_THREADS": "0"})


def _cgroup(root: Path, **files: str) -> Path:
    for name, text in files.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_quotas_v2_and_v1(tmp_path: Path) -> None:
    assert threads.cgroup_quota_cores(_cgroup(tmp_path / "v2", **{"cpu.max": "150000 100000\n"})) == 2  # 1.5 cores
    assert threads.cgroup_quota_cores(_cgroup(tmp_path / "v2max", **{"cpu.max": "max 100000\n"})) is None
    v1 = _cgroup(tmp_path / "v1", **{"cpu__cpu.cfs_quota_us": "300000", "cpu__cpu.cfs_period_us": "100000"})
    assert threads.cgroup_quota_cores(v1) == 3
    unlimited = _cgroup(tmp_path / "v1none", **{"cpu__cpu.cfs_quota_us": "-1", "cpu__cpu.cfs_period_us": "100000"})
    assert threads.cgroup_quota_cores(unlimited) is None
    assert threads.cgroup_quota_cores(tmp_path / "nothing") is None


def test_spinning_only_for_a_lone_process_on_a_quiet_machine() -> None:
    assert threads.spinning_allowed(1, load=0.3, cores=2)
    assert not threads.spinning_allowed(2, load=0.0, cores=2)  # our own workers side by side
    assert not threads.spinning_allowed(1, load=2.5, cores=2)  # others hold the cores
    assert threads.machine_shared(1, load=10.0, cores=2)
    assert threads.machine_shared(1, load=0.0, cores=2, busy=1.0)  # others busy now, the load average lags
    assert not threads.machine_shared(1, load=0.2, cores=2, busy=0.1)


@pytest.fixture
def busy_loops() -> Iterator[int]:
    """One busy-loop process per usable core, for the test's length."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads.usable_cores())]
    try:
        yield len(loops)
    finally:
        for p in loops:
            p.kill()
            p.wait()


def test_busy_cores_sees_other_processes_at_once(busy_loops: int) -> None:
    busy = threads.busy_cores(0.3)
    assert busy is not None and busy >= 0.6 * busy_loops, busy
    assert threads.machine_shared()


def test_cli_sets_passive_waiting_before_torch_loads(busy_loops: int) -> None:
    """On a machine other processes keep busy, the variable must be in the environment when
    torch (and its OpenMP runtime) is first imported: an import hook records it at that
    moment. A user's own value is kept."""
    code = (
        "import os, sys, json\n"
        "seen = {}\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and 'torch' not in seen:\n"
        "            seen['torch'] = os.environ.get('OMP_WAIT_POLICY')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "import modeconn.training.cli\n"
        "print(json.dumps(seen))\n"
    )
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout
    assert json.loads(run(_clean_env())) == {"torch": "PASSIVE"}
    assert json.loads(run({**_clean_env(), "OMP_WAIT_POLICY": "ACTIVE"})) == {"torch": "ACTIVE"}


def test_contract_threads_imports_no_torch() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, modeconn.contract.threads; print('torch' in sys.modules)"],
                         env=_clean_env(), cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _probe_threads(env: dict[str, str]) -> dict[str, int]:
    """Thread counts a real `modeconn` process sets at stage start: the CLI runs a command that
    fails on a missing file after the threads are set; then torch is asked."""
    code = (
        "import json, sys, torch\n"
        "from modeconn.training import cli\n"
        "cli.main(['eval-curve', 'nowhere'])\n"
        "print(json.dumps({'threads': torch.get_num_threads(), 'interop': torch.get_num_interop_threads()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_sets_torch_threads_from_the_share_and_the_override() -> None:
    cores = threads.usable_cores()
    assert _probe_threads(_clean_env()) == {"threads": cores, "interop": cores}
    assert _probe_threads({**_clean_env(), "MODECONN_THREADS": "3"}) == {"threads": 3, "interop": 3}
    # two ranks on this node (what torchrun says in LOCAL_WORLD_SIZE): half the cores each
    assert _probe_threads({**_clean_env(), "LOCAL_WORLD_SIZE": "2"})["threads"] == max(1, cores // 2)


def test_a_bad_override_is_one_line_and_exit_status_2() -> None:
    env = {**_clean_env(), "MODECONN_THREADS": "many"}
    proc = subprocess.run([sys.executable, "-m", "modeconn", "eval-curve", "nowhere"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("modeconn eval-curve: error: MODECONN_THREADS='many': not an integer "
                                   "(threads per process)")


def _worker_settings(tag: int) -> dict[str, object]:
    """What a run_jobs worker process computes with (module level: the worker imports it)."""
    import multiprocessing

    import torch

    return {"tag": tag, "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "start_method": multiprocessing.get_start_method()}


def test_run_jobs_workers_get_their_share_and_wait_passively(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from modeconn.training.core.distributed import Job, run_jobs

    for name in ("MODECONN_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    jobs = [Job(_worker_settings, (i,)) for i in range(2)]
    seen = run_jobs(jobs, parallel=2, device=torch.device("cpu"))
    share = max(1, threads.usable_cores() // 2)
    # the workers are spawned, but start their own processes (DataLoader workers) as this one does
    here = multiprocessing.get_start_method()
    assert seen == [{"tag": i, "threads": share, "wait_policy": "PASSIVE", "start_method": here} for i in range(2)]
    monkeypatch.setenv("MODECONN_THREADS", "3")
    assert [s["threads"] for s in run_jobs(jobs, parallel=2, device=torch.device("cpu"))] == [3, 3]


def test_service_settings_use_the_same_share(monkeypatch: pytest.MonkeyPatch) -> None:
    from modeconn.serving.settings import ServiceSettings

    for name in ("MODECONN_THREADS", "OMP_NUM_THREADS", "MODECONN_ORT_THREADS", "MODECONN_ORT_SPINNING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODECONN_WORKERS", "2")
    two = ServiceSettings.from_env().onnxruntime
    assert two.threads == max(1, threads.usable_cores() // 2) and two.spinning is False
    monkeypatch.setenv("MODECONN_WORKERS", "1")
    one = ServiceSettings.from_env().onnxruntime
    assert one.threads == threads.usable_cores()
    monkeypatch.setenv("MODECONN_THREADS", "1")
    assert ServiceSettings.from_env().onnxruntime.threads == 1
    monkeypatch.setenv("MODECONN_ORT_THREADS", "2")  # the serving-specific variable is stronger
    monkeypatch.setenv("MODECONN_ORT_SPINNING", "on")
    assert ServiceSettings.from_env().onnxruntime == type(one)(threads=2, spinning=True)
