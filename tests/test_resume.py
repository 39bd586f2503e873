"""Resume checkpoints: two kept, a truncated one detected and the previous good one used."""

from __future__ import annotations

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
