"""Linear probing: LARS, the head, the lr grid chosen on the hold-out split, resume (online mode:
test_linprobe_online.py)."""

import json
import math
import re

import pytest
import torch

from conftest import run_semmae, sigkill_after_first_checkpoint, write_params
from pipeline.config.linprobe import LinprobeConfig
from pipeline.eval.lars import LARS
from pipeline.eval.linprobe import chosen_curve, probe_cached, probe_features, train_probe


def test_lars_matches_a_hand_computed_step():
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    # w: d = grad + 0.5 w = [[2.5, 0], [0, 3]], ||d|| = sqrt(15.25); ratio = 0.001 * 5 / sqrt(15.25)
    ratio = 0.001 * 5 / math.sqrt(15.25)
    torch.testing.assert_close(w.data, torch.tensor([[3 - 0.5 * 2.5 * ratio, 0.0], [0.0, 4 - 0.5 * 3 * ratio]]))
    # bias (ndim 1): no weight decay, no trust ratio: plain momentum SGD
    torch.testing.assert_close(b.data, torch.tensor([0.75, -1.25]))
    b.grad = torch.tensor([1.0, 0.0])
    opt.step()
    torch.testing.assert_close(b.data, torch.tensor([0.75 - 0.5 * (0.9 * 0.5 + 1.0), -1.25 - 0.5 * (0.9 * 0.5)]))


def test_lars_adapts_at_zero_weight_decay():
    """The probe's setting: the trust ratio still applies (timm's Lars would fall back to SGD)."""
    w = torch.nn.Parameter(torch.full((2, 2), 1.0))  # ||w|| = 2
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 100.0)  # ||g|| = 200
    opt.step()
    torch.testing.assert_close(w.data, torch.full((2, 2), 1.0 - 100.0 * 0.001 * 2 / 200))


def separable(n, dim=32, classes=4, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_probe_reaches_95_percent_on_separable_features():
    splits = {"train": separable(800), "holdout": separable(100, seed=2), "val": separable(200, seed=1)}
    cfg = LinprobeConfig(epochs=30, warmup_epochs=3, batch_size=64, base_lr=4.0)
    metrics, _ = probe_features(lambda f: f, splits, 4, cfg, torch.device("cpu"))
    assert metrics["top1"] >= 0.95 and metrics["knn_top1"] >= 0.95 and metrics["holdout_knn_top1"] >= 0.95
    assert metrics["base_lr"] == 4.0 and list(metrics["holdout_by_lr"]) == ["4.0"]
    assert metrics["holdout_top1"] == metrics["holdout_by_lr"]["4.0"] >= 0.95
    assert "top5" not in metrics  # fewer than 5 classes


def test_each_head_of_a_grid_trains_as_it_would_alone():
    """Same initialisation, same batches, independent optimisers: a grid is several single runs at once."""
    x, y = separable(300, dim=16)
    cfg = LinprobeConfig(epochs=3, warmup_epochs=1, batch_size=32, base_lr=[0.5, 4.0, 20.0])
    grid = train_probe(x, y, 4, cfg, torch.device("cpu"))
    alone = train_probe(x, y, 4, cfg.model_copy(update={"base_lr": [4.0]}), torch.device("cpu"))
    for (k, a), (_, b) in zip(grid[4.0].state_dict().items(), alone[4.0].state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert not torch.equal(grid[0.5][1].weight, grid[20.0][1].weight)


def rigged_splits(lrs: list[float], holdout_favours: float, val_favours: float):
    """Features whose hold-out labels agree with the head trained at ``holdout_favours`` and whose val
    labels agree with the head at ``val_favours``, on points where the two heads disagree."""
    x, y = separable(400, dim=16, classes=4)
    x = x + 4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # noisy: heads differ by lr
    cfg = LinprobeConfig(epochs=2, warmup_epochs=0, batch_size=50, base_lr=lrs)
    heads = train_probe(x, y, 4, cfg, torch.device("cpu"))
    probe = torch.randn(4000, 16, generator=torch.Generator().manual_seed(4)) * 6
    with torch.no_grad():
        pred = {lr: heads[lr](probe).argmax(1) for lr in (holdout_favours, val_favours)}
    differ = pred[holdout_favours] != pred[val_favours]
    assert differ.sum() >= 40
    pts = probe[differ][:40]
    feats = {"train": x, "holdout": pts[:20], "val": pts[20:]}
    labels = {"train": y, "holdout": pred[holdout_favours][differ][:20], "val": pred[val_favours][differ][20:40]}
    return cfg, feats, labels


@pytest.mark.parametrize(("holdout_favours", "val_favours"), [(10.0, 0.01), (0.01, 10.0)])
def test_the_lr_is_chosen_on_the_holdout_split_never_on_val(holdout_favours, val_favours):
    cfg, feats, labels = rigged_splits([0.01, 10.0], holdout_favours, val_favours)
    metrics, head = probe_cached(feats, labels, 4, cfg, torch.device("cpu"))
    assert metrics["base_lr"] == holdout_favours
    assert metrics["holdout_by_lr"][repr(holdout_favours)] == metrics["holdout_top1"] == 1.0
    assert metrics["holdout_by_lr"][repr(val_favours)] == 0.0
    assert metrics["top1"] == 0.0  # val is reported for the chosen head, although the other one scores 1.0 there
    with torch.no_grad():
        assert torch.equal(head(feats["holdout"]).argmax(1), labels["holdout"])


def test_a_tie_on_the_holdout_split_keeps_the_smaller_lr():
    import copy

    from pipeline.eval.linprobe import probe_head, select_and_evaluate

    x, y = separable(120, dim=8)
    torch.manual_seed(0)
    head = probe_head(8, 4).eval()
    heads = {8.0: head, 2.0: copy.deepcopy(head), 4.0: copy.deepcopy(head)}  # equal heads: equal hold-out scores
    heads[2.0][1].bias.data += torch.tensor([0.0, 0.0, 0.0, 1e-7])  # tell them apart without changing a prediction
    feats, labels = {"train": x[:40], "holdout": x[40:80], "val": x[80:]}, {"train": y[:40], "holdout": y[40:80], "val": y[80:]}
    metrics, chosen = select_and_evaluate(heads, feats, labels, LinprobeConfig(knn_k=5), torch.device("cpu"))
    assert len(set(metrics["holdout_by_lr"].values())) == 1 and metrics["base_lr"] == 2.0 and chosen is heads[2.0]
    assert list(metrics["holdout_by_lr"]) == ["2.0", "4.0", "8.0"]


class KilledAfter(Exception):
    pass


def test_a_killed_multi_head_probe_resumes_from_its_last_epoch(tmp_path):
    from pipeline.resume import ResumeStore

    class DyingStore(ResumeStore):  # a run killed right after its second epoch's checkpoint
        saves = 0

        def save(self, state):
            super().save(state)
            DyingStore.saves += 1
            if DyingStore.saves == 2:
                raise KilledAfter

    x, y = separable(200, dim=8)
    cfg = LinprobeConfig(epochs=5, warmup_epochs=1, batch_size=40, base_lr=[1.0, 10.0])
    rows_whole: list = []
    whole = train_probe(x, y, 4, cfg, torch.device("cpu"), log_row=lambda s, r: rows_whole.append({"step": s, **r}),
                        curve_rows=rows_whole)  # fmt: skip
    rows: list = []
    with pytest.raises(KilledAfter):
        train_probe(x, y, 4, cfg, torch.device("cpu"), log_row=lambda s, r: rows.append({"step": s, **r}),
                    store=DyingStore(tmp_path, "fp"), curve_rows=rows)  # fmt: skip
    logged: list = []

    def log_row(step, r):
        logged.append(r["epoch"])
        rows.append({"step": step, **r})

    resumed = train_probe(x, y, 4, cfg, torch.device("cpu"), log_row=log_row, store=ResumeStore(tmp_path, "fp"),
                          curve_rows=rows)  # fmt: skip
    assert logged == [3, 4, 5]  # started from epoch 2 (of 5), not from scratch
    for lr in cfg.base_lrs():
        for (k, a), (_, b) in zip(whole[lr].state_dict().items(), resumed[lr].state_dict().items()):
            torch.testing.assert_close(a, b, msg=f"{lr} {k}")
    assert rows == rows_whole
    picked = chosen_curve(rows, 10.0)
    assert [r["loss"] for r in picked] == [r["loss_lr10.0"] for r in rows] and "train_top1" in picked[0]


def test_eval_crop_pct_resizes_then_centre_crops():
    import numpy as np
    from PIL import Image

    from pipeline.data.images import to_square

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))  # w 40, h 30
    full = to_square(img, 16)
    expected = np.asarray(img.resize((21, 16), Image.Resampling.BICUBIC).crop((2, 0, 18, 16))).transpose(2, 0, 1)
    np.testing.assert_array_equal(full, expected)  # crop_pct 1.0: the shorter side becomes the crop
    cropped = to_square(img, 16, crop_pct=0.5)  # shorter side 32, then the central 16 x 16
    expected = np.asarray(img.resize((43, 32), Image.Resampling.BICUBIC).crop((13, 8, 29, 24))).transpose(2, 0, 1)
    np.testing.assert_array_equal(cropped, expected)
    with pytest.raises(ValueError, match="crop_pct"):
        to_square(img, 16, crop_pct=1.5)


@pytest.mark.slow
def test_killed_probe_resumes_to_the_same_head(fake_fmnist, tmp_path):
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare_dataset
    from pipeline.models.checkpoint import build_vit, save_backbone

    root, _ = fake_fmnist
    prepare_dataset(PrepareConfig(root=str(root), train_limit=100, val_limit=40, holdout_size=30, num_workers=0),
                    tmp_path / "prepared")  # fmt: skip
    shape = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1, "num_heads": 2, "embed_dim": 32}
    (tmp_path / "enc").mkdir()
    torch.manual_seed(0)
    save_backbone(build_vit(**shape), tmp_path / "enc" / "encoder.pth")
    (tmp_path / "enc" / "meta.json").write_text(json.dumps({**shape, "masking": "semantic", "seed": 0, "epochs": 1}))
    write_params(tmp_path / "params.yaml", linprobe={"epochs": 150, "warmup_epochs": 10, "batch_size": 16})

    def run(name: str, wait: bool = True):
        return run_semmae(tmp_path, "linprobe", "--prepared", "prepared", "--pretrained", "enc", "--out", f"{name}/out",
                          "--metrics", f"{name}/m.json", "--curves", f"{name}/c.tsv", "--resume", f"{name}/resume",
                          wait=wait)  # fmt: skip

    run("unbroken")
    proc = run("broken", wait=False)
    last = tmp_path / "broken" / "resume" / "last.pth"
    sigkill_after_first_checkpoint(proc, last, tmp_path / "broken" / "out")
    rerun = run("broken")
    for rel in ("out/head.pth", "m.json", "c.tsv"):
        assert (tmp_path / "broken" / rel).read_bytes() == (tmp_path / "unbroken" / rel).read_bytes(), rel
    assert not any((tmp_path / "broken" / "resume").iterdir())
    # the rerun continued the killed run (a deterministic run from scratch would give the same bytes): it
    # started after the checkpoint's epoch and trained only the epochs left
    start = [int(e) - 1 for e in re.findall(r"resuming at epoch (\d+) of 150", rerun.stderr)]
    assert len(start) == 1 and 1 <= start[0] < 150, rerun.stderr[-2000:]
    assert re.findall(r"(\d+) of 150 epochs trained in this run", rerun.stderr) == [str(150 - start[0])]
    metrics = json.loads((tmp_path / "broken" / "m.json").read_text())
    grid = LinprobeConfig().base_lrs()  # the default grid: four heads in one run
    assert list(metrics["holdout_by_lr"]) == [repr(lr) for lr in grid] and metrics["base_lr"] in grid
    assert metrics["holdout_top1"] == max(metrics["holdout_by_lr"].values())
    header, *rows = (tmp_path / "broken" / "c.tsv").read_text().splitlines()
    columns = header.split("\t")
    assert {"step", "loss", "train_top1", "lr", f"loss_lr{metrics['base_lr']!r}"} <= set(columns) and len(rows) == 150
    last = dict(zip(columns, rows[-1].split("\t")))
    assert last["loss"] == last[f"loss_lr{metrics['base_lr']!r}"]  # the plotted curve is the chosen head's


def test_a_class_without_training_images_is_refused_before_any_encoding(tmp_path):
    """The head has one output per class of index.json; one never trained would count its validation
    images as errors of the encoder."""
    from pipeline.eval.probe_run import ProbeError, _check_class_counts

    index = {"format": "semmae-shards/1", "classes": ["a", "b", "c"],
             "splits": {"train": {"class_counts": [5, 0, 5]}, "val": {"class_counts": [1, 1, 0]}}}  # fmt: skip
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ProbeError, match=r"has no \['holdout'\] split.*rerun prepare"):
        _check_class_counts(tmp_path)
    index["splits"]["holdout"] = {"class_counts": [1, 0, 0]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ProbeError, match=r"classes \['b'\] have hold-out or validation but no training images"):
        _check_class_counts(tmp_path)
    index["splits"]["val"]["class_counts"] = [1, 0, 0]
    index["splits"]["holdout"]["class_counts"] = [1, 1, 0]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ProbeError, match=r"classes \['b'\] have hold-out"):
        _check_class_counts(tmp_path)
    index["splits"]["holdout"]["class_counts"] = [1, 0, 0]
    index["splits"]["val"]["class_counts"] = [1, 1, 0]
    index["splits"]["train"]["class_counts"] = [5, 5]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ProbeError, match="class_counts do not match its 3 classes"):
        _check_class_counts(tmp_path)
    index["splits"]["train"]["class_counts"] = [5, 5, 0]  # a class with no images at all is harmless
    (tmp_path / "index.json").write_text(json.dumps(index))
    _check_class_counts(tmp_path)
