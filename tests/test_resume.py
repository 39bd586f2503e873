"""Resume checkpoints: two kept, a truncated one detected and the previous good one used."""

from __future__ import annotations

import pytest
import torch

from pipeline.resume import ResumeStore, fingerprint


def state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}}


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = ResumeStore(tmp_path / "r", fingerprint("config-a"))
    store.save(state(1))
    store.save(state(2))
    assert store.load()["epoch"] == 2 and store.prev.is_file()
    data = store.last.read_bytes()
    store.last.write_bytes(data[: len(data) // 2])  # a kill mid-write of a non-atomic writer, a full disk
    restored = store.load()
    assert restored["epoch"] == 1 and torch.equal(restored["model"]["w"], torch.ones(3))
    store.prev.write_bytes(b"garbage")
    assert store.load() is None  # nothing usable: train from scratch, not crash


def test_a_checkpoint_of_other_parameters_is_not_resumed(tmp_path):
    ResumeStore(tmp_path / "r", fingerprint("config-a")).save(state(3))
    assert ResumeStore(tmp_path / "r", fingerprint("config-b")).load() is None
    assert ResumeStore(tmp_path / "r", fingerprint("config-a")).load()["epoch"] == 3


SAVER = """
import sys, torch
from pipeline.resume import ResumeStore
store = ResumeStore(sys.argv[1], "fp")
state = store.load()
start = state["epoch"] if state else 0
for epoch in range(start + 1, start + 10_000):
    store.save({"epoch": epoch, "model": {"w": torch.full((1_000_000,), float(epoch))}})
    print(epoch, flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_saving_never_loses_the_newest_completed_state(tmp_path):
    """A process saving 4 MB states back to back is SIGKILLed at random moments (mostly inside save:
    torch.save, the temporary write, the two renames). After every kill each checkpoint under a final
    name loads whole, and resuming restores at least the newest state whose save had returned."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(0)
    store = ResumeStore(tmp_path / "r", "fp")
    newest = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(store.dir)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one save completed in this run: the loop is under way
        assert first, "the saver died before saving"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        done = [int(line) for line in (first + out).split()]
        newest = max(newest, done[-1])
        for path in (store.next, store.last, store.prev):  # whatever sits under a final name is complete
            if path.exists():
                s = torch.load(path, weights_only=True)
                assert torch.equal(s["model"]["w"], torch.full((1_000_000,), float(s["epoch"])))
        restored = store.load()
        assert restored is not None and restored["epoch"] >= newest
        newest = restored["epoch"]
    store.save(state(newest + 1))  # the next save also removes the temporaries the kills left
    assert sorted(p.name for p in store.dir.iterdir()) == ["last.pth", "prev.pth"]


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-resume",))


def test_a_hostile_resume_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ResumeStore(tmp_path / "r", "fp")
    store.save(state(1))
    store.save(state(2))
    torch.save({**state(3), "fingerprint": "fp", "extra": _Payload()}, store.last)  # planted by someone else
    restored = store.load()
    assert restored["epoch"] == 1 and not (tmp_path / "pwned-by-resume").exists()
