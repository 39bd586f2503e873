"""Linear probing (LARS, head, cached vs online) and the report."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_semmae, sigkill_after_first_checkpoint, write_params
from pipeline.config.linprobe import LinprobeConfig
from pipeline.eval.lars import LARS
from pipeline.eval.linprobe import probe_features, train_probe
from pipeline.eval.report import collect_rows, verdict

BIN = Path(sys.executable).parent


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
    x, y = separable(800)
    xv, yv = separable(200, seed=1)
    cfg = LinprobeConfig(epochs=30, warmup_epochs=3, batch_size=64, base_lr=4.0)
    metrics, _ = probe_features(lambda f: f, (x, y), (xv, yv), 4, cfg, torch.device("cpu"))
    assert metrics["top1"] >= 0.95 and metrics["knn_top1"] >= 0.95
    assert "top5" not in metrics  # fewer than 5 classes


def test_cached_and_online_probes_agree_without_augmentation():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(300) % 5
    proj = torch.randn(192, 24, generator=g)

    def encode(imgs):
        return (imgs.float().flatten(1) / 255) @ proj

    cfg = LinprobeConfig(epochs=4, warmup_epochs=1, batch_size=32, eval_batch_size=64)
    cached = train_probe(encode(images), labels, 5, cfg, torch.device("cpu"))
    online = train_probe(images, labels, 5, cfg.model_copy(update={"mode": "online"}), torch.device("cpu"), encode)
    for (k, a), (_, b) in zip(cached.state_dict().items(), online.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


def fabricate(root: Path, tops: dict[str, list[float]]) -> None:
    (root / "metrics" / "linprobe").mkdir(parents=True)
    (root / "metrics" / "pretrain").mkdir(parents=True)
    for variant, values in tops.items():
        for seed, top1 in enumerate(values):
            (root / "metrics" / "linprobe" / f"{variant}-{seed}.json").write_text(
                json.dumps({"top1": top1, "top5": 0.99, "knn_top1": top1 - 0.02}))
            (root / "metrics" / "pretrain" / f"{variant}-{seed}.json").write_text(json.dumps({"final_loss": 0.5}))
            for kind, cols in (("pretrain_curves", "loss\tlr\talpha"), ("linprobe_curves", "loss\ttrain_top1")):
                (root / "metrics" / kind).mkdir(exist_ok=True)
                rows = "".join(f"{s}\t" + "\t".join([f"{top1 + s}"] * len(cols.split())) + "\n" for s in range(3))
                (root / "metrics" / kind / f"{variant}-{seed}.tsv").write_text(f"step\t{cols}\n{rows}")
    ref = {"top1": 0.5, "top5": 0.9, "knn_top1": 0.45}
    (root / "metrics" / "linprobe" / "reference.json").write_text(json.dumps({"raw_pixels": ref, "random_encoder": ref}))


@pytest.mark.parametrize(("tops", "expected"), [
    ({"semantic": [0.70, 0.71, 0.72], "random": [0.60, 0.61, 0.62]}, "SemMAE beat MAE: +10.0 points"),
    ({"semantic": [0.60, 0.70, 0.65], "random": [0.64, 0.62, 0.66]}, "No difference above seed noise"),
    ({"semantic": [0.70], "random": [0.60]}, "with one seed per variant: no spread is measured"),
])  # fmt: skip
def test_report_renders_from_fabricated_metrics(tmp_path, tops, expected):
    fabricate(tmp_path, tops)
    seeds = list(range(len(tops["semantic"])))
    write_params(tmp_path / "params.yaml", linprobe={}, pretrain={"seeds": seeds, "common": {},
                 "variants": {"semantic": {"masking": "semantic"}, "random": {"masking": "random"}}})  # fmt: skip
    res = subprocess.run([str(BIN / "semmae"), "report"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "reports" / "linprobe.md").read_text()
    assert expected in md
    for row in ("| SemMAE (semantic masking) | masking=semantic |", "| MAE (random masking) | masking=random |", "| raw pixels |",
                "| random encoder (no pretraining) |"):  # fmt: skip
        assert row in md
    table = (tmp_path / "reports" / "linprobe.csv").read_text().splitlines()
    assert table[0] == "row,seeds,top1,top1_sd,top5,top5_sd,knn_top1,knn_top1_sd" and len(table) == 5
    assert f"MAE (random masking),{len(seeds)},{100 * sum(tops['random']) / len(seeds):.2f}," in "\n".join(table)
    curves = (tmp_path / "reports" / "curves" / "pretrain.tsv").read_text().splitlines()
    assert curves[0] == "run\tstep\tloss\tlr\talpha" and len(curves) == 1 + 3 * 2 * len(seeds)  # every run's rows
    assert {line.split("\t")[0] for line in curves[1:]} == {f"{v}-{s}" for v in tops for s in seeds}
    summary = json.loads((tmp_path / "metrics" / "report.json").read_text())
    assert all(isinstance(v, (int, float)) for row in summary.values() for v in row.values())  # numbers only
    assert summary["verdict"]["semantic_minus_random_top1"] == pytest.approx(
        sum(tops["semantic"]) / len(seeds) - sum(tops["random"]) / len(seeds))


def test_report_names_a_missing_metrics_file(tmp_path):
    fabricate(tmp_path, {"semantic": [0.7], "random": [0.6]})
    (tmp_path / "metrics" / "linprobe" / "random-0.json").unlink()
    with pytest.raises(Exception, match=r"random-0.json not found: run the stage that writes it"):
        collect_rows(tmp_path / "metrics" / "linprobe", tmp_path / "metrics" / "pretrain",
                     {"semantic": {}, "random": {}}, [0])  # fmt: skip
    assert verdict([])["text"].startswith("no comparison")


def test_killed_probe_resumes_to_the_same_head(fake_fmnist, tmp_path):
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare_dataset
    from pipeline.models.checkpoint import build_vit, save_backbone

    root, _ = fake_fmnist
    prepare_dataset(PrepareConfig(root=str(root), train_limit=100, val_limit=40, num_workers=0), tmp_path / "prepared")
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
    run("broken")
    for rel in ("out/head.pth", "m.json", "c.tsv"):
        assert (tmp_path / "broken" / rel).read_bytes() == (tmp_path / "unbroken" / rel).read_bytes(), rel
    assert not any((tmp_path / "broken" / "resume").iterdir())


def test_a_class_without_training_images_is_refused_before_any_encoding(tmp_path):
    """The head has one output per class of index.json; one never trained would count its validation
    images as errors of the encoder."""
    from pipeline.eval.probe_run import ProbeError, _check_class_counts

    index = {"format": "semmae-shards/1", "classes": ["a", "b", "c"],
             "splits": {"train": {"class_counts": [5, 0, 5]}, "val": {"class_counts": [1, 1, 0]}}}  # fmt: skip
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ProbeError, match=r"classes \['b'\] have validation but no training images"):
        _check_class_counts(tmp_path)
    index["splits"]["train"]["class_counts"] = [5, 5]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ProbeError, match="class_counts do not match its 3 classes"):
        _check_class_counts(tmp_path)
    index["splits"]["train"]["class_counts"] = [5, 5, 0]  # a class with no images at all is harmless
    (tmp_path / "index.json").write_text(json.dumps(index))
    _check_class_counts(tmp_path)
