"""What the real-control-plane harness leaves on disk when it stops: nothing
after a clean run; after a failed run the logs and configs to read the
failure from, but not etcd's data (a preallocated 64 MB WAL per run filled
the CI machine's disk once)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "controlplane"))
from controlplane import ETCD_DATA, ControlPlane  # noqa: E402


def _stopped_plane(tmp_path: Path, keep: bool) -> ControlPlane:
    cp = ControlPlane(binaries={}, keep=keep, verbose=False)
    cp.dir = tmp_path / "plane"
    (cp.dir / ETCD_DATA / "member" / "wal").mkdir(parents=True)
    (cp.dir / ETCD_DATA / "member" / "wal" / "0.wal").write_bytes(b"\0" * 4096)
    (cp.dir / "etcd.log").write_text("etcd said something\n")
    (cp.dir / "kube-apiserver.log").write_text("apiserver said something\n")
    return cp


@pytest.mark.parametrize(
    "failed, keep, left",
    [
        (False, False, None),
        (True, False, {"etcd.log", "kube-apiserver.log"}),
        (True, True, {"etcd.log", "kube-apiserver.log", ETCD_DATA}),
        (False, True, {"etcd.log", "kube-apiserver.log", ETCD_DATA}),
    ],
)
def test_close_leaves_only_what_a_failure_is_read_from(tmp_path, monkeypatch, failed, keep, left):
    monkeypatch.delenv("ENVLANE_CONTROLPLANE_KEEP", raising=False)
    cp = _stopped_plane(tmp_path, keep)
    cp.close(failed=failed)
    if left is None:
        assert not cp.dir.exists()
    else:
        assert {p.name for p in cp.dir.iterdir()} == left
