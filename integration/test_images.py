"""The envlane-sync image builder for several platforms (scripts/oci.py
MultiArch, scripts/images.sh ENVLANE_SYNC_PLATFORMS) and that images.sh
installs nothing (scripts/tools.sh image-deps is the setup step).

The multi-arch index is checked with fake ELF headers here (always), and, when
dist/oci/envlane-sync holds one, the built index: every platform's layer holds
a static binary of that platform's machine.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import oci  # noqa: E402

LAYOUT = ROOT / "dist" / "oci" / "envlane-sync"
MACHINE = {"amd64": 62, "arm64": 183}


def fake_elf(machine: int, interp: bool = False) -> bytes:
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", header, 18, machine)
    struct.pack_into("<Q", header, 32, 64)
    struct.pack_into("<HH", header, 54, 56, 1)
    ph = bytearray(56)
    struct.pack_into("<I", ph, 0, 3 if interp else 1)
    return bytes(header + ph) + bytes([machine])  # the machine also makes the bytes differ


def test_arch_from_the_elf_header():
    assert oci.elf_arch(fake_elf(62)) == "amd64"
    assert oci.elf_arch(fake_elf(183)) == "arm64"
    assert oci.elf_arch(fake_elf(40)) is None  # 32-bit ARM
    assert oci.elf_is_static(fake_elf(183)) == (True, "static")
    assert not oci.elf_is_static(fake_elf(183, interp=True))[0]
    assert not oci.elf_is_static(fake_elf(40))[0]


def test_multiarch_index():
    m = oci.sync_multiarch({"arm64": fake_elf(183), "amd64": fake_elf(62)}, "reg.example/x", "1.2.3")
    index = json.loads(m.index_blob.data)
    assert index["mediaType"] == oci.OCI_INDEX
    platforms = [d["platform"] for d in index["manifests"]]
    assert platforms == [{"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux"}]
    by_arch = {json.loads(i.config.data)["architecture"]: i for i in m.images}
    for desc in index["manifests"]:
        image = by_arch[desc["platform"]["architecture"]]
        assert desc["digest"] == image.digest and desc["mediaType"] == oci.OCI_MANIFEST
    files = m.files()
    top = json.loads(files["index.json"][0])
    (desc,) = top["manifests"]
    assert desc["mediaType"] == oci.OCI_INDEX and desc["digest"] == m.digest
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "1.2.3"
    blobs = {k.removeprefix("blobs/sha256/"): v for k, (v, _) in files.items() if k.startswith("blobs/")}
    for name, data in blobs.items():
        assert oci.sha256_hex(data) == name
    for image in m.images:
        for blob in image.blobs():
            assert blob.digest.split(":")[1] in blobs
    # Reproducible, and each platform's bytes matter.
    assert oci.sync_multiarch({"amd64": fake_elf(62), "arm64": fake_elf(183)}, "reg.example/x", "1.2.3").digest == m.digest
    assert oci.sync_multiarch({"amd64": fake_elf(62), "arm64": fake_elf(183) + b"\0"}, "reg.example/x", "1.2.3").digest != m.digest


def test_a_binary_of_the_wrong_platform_is_refused():
    with pytest.raises(SystemExit):
        oci.sync_multiarch({"amd64": fake_elf(183), "arm64": fake_elf(183)})


def test_layout_write_and_tarball(tmp_path):
    m = oci.sync_multiarch({"amd64": fake_elf(62), "arm64": fake_elf(183)}, version="0.0.0")
    m.write(tmp_path / "layout", tmp_path / "x.tar")
    check_index_layout(tmp_path / "layout", expect_static=False)
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert "index.json" in tar.getnames()


def check_index_layout(layout: Path, expect_static: bool = True) -> dict[str, str]:
    """Follows index.json -> image index -> per-platform manifests; returns arch -> manifest digest."""
    blob = lambda d: (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()  # noqa: E731
    (top,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert top["mediaType"] == oci.OCI_INDEX
    index = json.loads(blob(top["digest"]))
    out = {}
    for desc in index["manifests"]:
        arch = desc["platform"]["architecture"]
        manifest = json.loads(blob(desc["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        assert config["architecture"] == arch and config["os"] == "linux"
        (layer,) = manifest["layers"]
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layer["digest"])))) as tar:
            binary = tar.extractfile("envlane-sync").read()
        assert struct.unpack_from("<H", binary, 18)[0] == MACHINE[arch], arch
        if expect_static:
            assert oci.elf_is_static(binary) == (True, "static"), arch
        out[arch] = desc["digest"]
    return out


def test_built_multiarch_layout():
    index = LAYOUT / "index.json"
    if not index.is_file():
        pytest.skip("dist/oci/envlane-sync is not built (scripts/images.sh)")
    (top,) = json.loads(index.read_text())["manifests"]
    if top["mediaType"] != oci.OCI_INDEX:
        pytest.skip("dist/oci/envlane-sync is one platform (ENVLANE_SYNC_PLATFORMS=linux/amd64,linux/arm64 builds both)")
    assert set(check_index_layout(LAYOUT)) == {"amd64", "arm64"}


def test_images_sh_installs_nothing():
    text = (ROOT / "scripts" / "images.sh").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for pattern in (r"apt-get", r"\bdpkg\b", r"pip install", r"cargo install", r"rustup target add", r"\bcurl\b", r"\bwget\b"):
        assert not re.search(pattern, code), f"scripts/images.sh runs {pattern}: installing belongs in scripts/tools.sh"


def test_images_sh_skips_the_sync_image_without_its_toolchain(tmp_path):
    """No musl toolchain on PATH: the sync image is skipped, saying what to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "grep", "sed", "python3", "env"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "images.sh"), "sync"], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root"),
                              "ENVLANE_SYNC_PLATFORMS": "linux/amd64,linux/arm64"})
    assert out.returncode == 0, out.stderr
    assert "SKIPPING the envlane-sync image" in out.stderr and "scripts/tools.sh image-deps" in out.stderr, out.stderr
    for what in ("musl-gcc", "zig", "cargo-zigbuild", "aarch64-unknown-linux-musl"):
        assert what in out.stderr, what
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "images.sh"), "sync"], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(bin_dir), "ENVLANE_SYNC_PLATFORMS": "linux/s390x"})
    assert bad.returncode == 2 and "linux/s390x" in bad.stderr
