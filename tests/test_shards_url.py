"""shards_url: pretraining reads the same samples in the same order through a URL as from the part-shard
directory. The loader's batches (images, part maps, labels, masking noise) of two epochs and the figures'
fixed validation images are compared with the local ones, through file://, pipe: and http:// (a local
http.server; webdataset fetches it with curl), the shard list coming from pretrain's own code."""

from __future__ import annotations

import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import make_part_shards
from pipeline.config import PretrainConfig
from pipeline.data.shards import PARTS_FORMAT, shard_entries
from pipeline.mae.data import fixed_images, make_loader
from pipeline.mae.train import _train_shards  # the stage's shard list (and counts), URL or not

NUM_PARTS, BATCH = 4, 8


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    """The part shards (8 train shards of 12, 2 val shards of 8), a directory holding only their index.json,
    and a copy whose train shards 0 and 1 trade places (a URL source serving them in another order)."""
    root = tmp_path_factory.mktemp("urls")
    local = make_part_shards(root / "part_shards", n_train=96, n_val=16, shard_size=12)
    index_only = root / "index_only"
    index_only.mkdir()
    shutil.copy(local / "index.json", index_only / "index.json")
    swapped = root / "swapped"
    shutil.copytree(local, swapped)
    for a, b in (("000000", "tmp"), ("000001", "000000"), ("tmp", "000001")):
        (swapped / "train" / f"train-{a}.tar").rename(swapped / "train" / f"train-{b}.tar")
    return {"local": local, "index_only": index_only, "swapped": swapped}


REQUESTED: list[str] = []


@pytest.fixture(scope="module")
def http_root(shard_sets):
    """``http://127.0.0.1:<port>`` serving the directory of the part shards; the paths asked for go to REQUESTED."""

    class Recording(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # called once per request, after it is served
            REQUESTED.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Recording, directory=str(shard_sets["local"].parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def config(shards_url: str | None = None, num_workers: int = 0) -> PretrainConfig:
    return PretrainConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                          decoder_depth=1, decoder_num_heads=2, batch_size=BATCH, shuffle_buffer=16, loader_streams=2,
                          num_workers=num_workers, shards_url=shards_url)  # fmt: skip


def seen(cfg: PretrainConfig, part_shards: Path) -> list[torch.Tensor]:
    """Every tensor the loader yields over two epochs (each the whole train split), and the 12 fixed images
    and part maps the figures take from val, read as pretrain reads them."""
    shards, counts = _train_shards(cfg, part_shards)
    out = []
    for epoch in range(2):
        loader = make_loader(shards, NUM_PARTS, cfg.img_size, cfg.grid, BATCH, 96 // BATCH, epoch, cfg.seed,
                             cfg.crop_scale, cfg.crop_ratio, cfg.hflip, cfg.shuffle_buffer, cfg.num_workers,
                             cfg.loader_streams, cfg.grid * cfg.grid, cfg.decode, counts, cfg.on_corrupt)  # fmt: skip
        out += [t.clone() for batch in loader for t in batch]
    val = [e.path for e in shard_entries(part_shards, "val", PARTS_FORMAT, url=cfg.shards_url)]
    return out + list(fixed_images(val, 12, NUM_PARTS, cfg.img_size, cfg.grid))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal tensor lists; the first difference is printed (pytest shows it with a failure)."""
    if len(a) != len(b):
        print(f"{len(a)} tensors vs {len(b)}")
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or not torch.equal(x, y):
            print(f"tensor {i} differs: {tuple(x.shape)} vs {tuple(y.shape)}")
            return False
    return True


@pytest.fixture(scope="module")
def local(shard_sets) -> list[torch.Tensor]:
    return seen(config(), shard_sets["local"])


@pytest.mark.parametrize("scheme", ["file", "pipe", "http"])
def test_a_url_gives_the_batches_of_the_local_shards(scheme, shard_sets, local, request):
    if scheme == "http" and shutil.which("curl") is None:
        pytest.skip("webdataset fetches http:// with curl, which is not installed")
    where = {"file": f"file://{shard_sets['local']}", "pipe": f"pipe:cat {shard_sets['local']}",
             "http": "" if scheme != "http" else f"{request.getfixturevalue('http_root')}/part_shards"}[scheme]  # fmt: skip
    cfg = config(f"{where}/{{path}}", num_workers=2 if scheme == "http" else 0)  # workers fetch over http
    via_url = seen(cfg, shard_sets["index_only"])
    assert len(local) == 2 * 12 * 4 + 2 and local[0].shape == (BATCH, 3, 16, 16)
    assert same(via_url, local)
    if scheme == "http":  # it did come over http: every train shard and the val shard holding the 12 fixed images
        assert sorted(set(REQUESTED)) == [f"/part_shards/{s}-00000{i}.tar" for s, n in (("train/train", 8), ("val/val", 1))
                                          for i in range(n)]  # fmt: skip


def test_the_comparison_sees_shards_served_in_another_order(shard_sets, local):
    """The check above has teeth: a source serving train shards 0 and 1 swapped (same samples, same index
    counts) gives other batches, and so does another seed."""
    swapped = seen(config(f"file://{shard_sets['swapped']}/{{path}}"), shard_sets["index_only"])
    assert not same(swapped, local)
    assert same(swapped[-2:], local[-2:])  # the val shards were not touched
    reseeded = seen(config().model_copy(update={"seed": 1}), shard_sets["local"])
    assert not same(reseeded, local)
