"""The deployed record on disk: atomic replacement, an event log, one holder of the lock.

Real processes: a second lock holder, and writers killed with SIGKILL mid-write.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployer.planning.redeploy import Deployed
from deployer.serving.state import FileStateStore, StateError

pytestmark = pytest.mark.integration


def record(n: int) -> Deployed:
    return Deployed(
        models=[{"model_id": f"m{i}", "gpu_memory_gib": 1.0} for i in range(n)],
        placements=[{"model_id": f"m{i}", "node": "a", "gpus": [0]} for i in range(n)],
        engines={f"m{i}": {"padding": "x" * 4096} for i in range(n)},
    )


def test_written_records_read_back_and_none_forgets(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path / "state")
    assert store.read() is None
    store.write(record(3))
    assert store.read() == record(3)
    store.write(None)
    assert store.read() is None
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == []  # no temporary left


def test_a_damaged_state_file_is_one_message(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    (tmp_path / "deployed.json").write_bytes(b'{"models": [')
    with pytest.raises(StateError, match="not a rackserve state file"):
        store.read()


def test_events_are_kept_in_order_and_bad_lines_skipped(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    for i in range(5):
        store.record("redeployed", models=[f"m{i}"])
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(b"{half a line")  # a crash mid-append
    store.record("node_lost", node="gpu-2")
    events = store.events(last=3)
    assert [e["event"] for e in events] == ["redeployed", "redeployed", "node_lost"]
    assert events[0]["models"] == ["m3"]
    assert all("at" in e for e in events)


def _hold_lock(directory: str, ready: multiprocessing.synchronize.Event) -> None:
    with FileStateStore(Path(directory)).lock():
        ready.set()
        time.sleep(60)


def test_a_second_holder_waits_then_gets_one_message_naming_the_first(tmp_path: Path) -> None:
    ready = multiprocessing.get_context("spawn").Event()
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold_lock, args=(str(tmp_path), ready)
    )
    holder.start()
    try:
        assert ready.wait(30)
        start = time.monotonic()
        busy = rf"pid {holder.pid} .*is changing the deployment"
        with pytest.raises(StateError, match=busy), FileStateStore(tmp_path).lock(wait_s=0.5):
            pass
        assert time.monotonic() - start >= 0.5
    finally:
        holder.kill()  # a holder that dies releases the lock
        holder.join()
    with FileStateStore(tmp_path).lock(wait_s=5):
        pass


WRITER = """
import sys
from pathlib import Path
from deployer.planning.redeploy import Deployed
from deployer.serving.state import FileStateStore
store = FileStateStore(Path(sys.argv[1]))
n = 0
while True:
    n += 1
    store.write(Deployed(models=[{"n": n}], placements=[], engines={"x": {"pad": "y" * 200000}}))
    print(n, flush=True)
"""


def test_killed_mid_write_leaves_a_whole_record(tmp_path: Path) -> None:
    """SIGKILL at random points of a writing loop: what is read back is always one whole record."""
    store = FileStateStore(tmp_path)
    for attempt in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert writer.stdout is not None
        for _ in range(3 + attempt):
            writer.stdout.readline()  # some writes have completed
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        found = store.read()
        assert found is not None
        assert found.engines["x"]["pad"] == "y" * 200000
        assert isinstance(found.models[0]["n"], int)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".deployed.json.")]
    assert len(leftovers) <= 8  # a killed writer may leave its temporary file, never a bad record
    json.loads((tmp_path / "deployed.json").read_bytes())
