#!/usr/bin/env python3
"""Build envlane's OCI images without a container daemon (stdlib only).

    python3 scripts/oci.py filter [--wasm dist/envlane.wasm] [--variant compat|artifact]
    python3 scripts/oci.py sync   [--binary target/x86_64-unknown-linux-musl/release/envlane-sync]
    python3 scripts/oci.py sync   --binary amd64=PATH --binary arm64=PATH   # multi-arch (an image index)
    python3 scripts/oci.py digest --wasm dist/envlane.wasm   # print the filter manifest digest only

Each image is written as an OCI image layout directory (``oci-layout``,
``index.json``, ``blobs/sha256/...``) under ``dist/oci/<name>/`` and as one
tarball ``dist/<name>.oci.tar`` holding the same layout (plus a docker-save
style ``manifest.json``, so ``docker load`` / ``podman load`` accept it too).

Everything is deterministic: tar entries are sorted with fixed mtime 0,
uid/gid 0 and fixed modes; gzip has mtime 0 and no file name; JSON is written
with sorted keys and no whitespace; no timestamp goes anywhere. The same input
bytes always give the same manifest digest, which is what
``scripts/gen_manifests.py`` pins in the WasmPlugin.

The filter image follows what Istio's Wasm image fetcher
(istio/istio pkg/wasm/imagefetcher.go) accepts for ``oci://`` URLs:

* ``compat`` (default, the one we pin): an ordinary OCI image whose *last*
  layer is ``application/vnd.oci.image.layer.v1.tar+gzip`` and contains a
  file named ``plugin.wasm``; the manifest carries the annotation
  ``module.wasm.image/variant: compat``. Istio tries this form first for OCI
  manifests. Every registry and every tool (crane, skopeo, oras, docker,
  podman) handles it.
* ``artifact``: the Wasm OCI artifact form. Istio requires exactly two layers,
  one of them ``application/vnd.module.wasm.content.layer.v1+wasm`` holding the
  raw module (not a tar); the other is the ``runtime-config.json`` layer of
  type ``application/vnd.module.wasm.config.v1+json``, which is also the
  manifest's config media type. Needs a registry that accepts OCI artifacts.

For ``oci://`` URLs Istio compares the WasmPlugin ``sha256`` with the image
*manifest digest*, not with the module's own sha256 (that one is only used for
``http(s)://`` and ``file://`` URLs).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import struct
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"

NONROOT_UID = 65532
SYNC_ENTRYPOINT = "/envlane-sync"
SYNC_PORT = 9090
SOURCE = "https://github.com/envlane/envlane"


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    media_type: str
    data: bytes
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return "sha256:" + sha256_hex(self.data)

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass
class Entry:
    """One file or directory of a layer tar."""

    name: str  # relative, no leading slash; directories end with '/'
    mode: int
    data: bytes = b""


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed, reproducible tar: sorted names, mtime 0, root-owned."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for e in sorted(entries, key=lambda e: e.name):
            info = tarfile.TarInfo(e.name.rstrip("/"))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = e.mode
            if e.name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    # No file name in the header (BytesIO has none), mtime 0: reproducible.
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


@dataclass
class Image:
    """One image manifest with its config and layers, ready to write."""

    name: str  # layout name, e.g. envlane-filter
    ref: str  # the full reference it is meant to be pushed as (repo:tag)
    tag: str
    config: Blob
    layers: list[Blob]
    annotations: dict[str, str]

    @property
    def manifest(self) -> Blob:
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.config.descriptor(),
            "layers": [layer.descriptor() for layer in self.layers],
            "annotations": self.annotations,
        }
        return Blob(OCI_MANIFEST, canonical_json(body))

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def index(self) -> Blob:
        desc = self.manifest.descriptor()
        desc["annotations"] = {"org.opencontainers.image.ref.name": self.tag}
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}
        return Blob(OCI_INDEX, canonical_json(body))

    def blobs(self) -> list[Blob]:
        return [self.manifest, self.config, *self.layers]

    def files(self) -> dict[str, tuple[bytes, int]]:
        """The layout's files: relative path -> (content, mode)."""
        files: dict[str, tuple[bytes, int]] = {
            "oci-layout": (canonical_json({"imageLayoutVersion": "1.0.0"}), 0o644),
            "index.json": (self.index().data, 0o644),
            # docker-save style, so `docker load` of the tarball tags the image.
            "manifest.json": (
                canonical_json(
                    [
                        {
                            "Config": "blobs/sha256/" + self.config.digest.split(":", 1)[1],
                            "RepoTags": [self.ref],
                            "Layers": ["blobs/sha256/" + b.digest.split(":", 1)[1] for b in self.layers],
                        }
                    ]
                ),
                0o644,
            ),
        }
        for blob in self.blobs():
            files["blobs/sha256/" + blob.digest.split(":", 1)[1]] = (blob.data, 0o644)
        return files

    def write(self, layout_dir: Path, tarball: Path) -> None:
        files = self.files()
        if layout_dir.exists():
            # Only ever our own output: drop stale blobs of earlier builds.
            for p in sorted(layout_dir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
        for rel, (data, mode) in files.items():
            path = layout_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        dirs = {"blobs/", "blobs/sha256/"}
        entries = [Entry(d, 0o755) for d in dirs] + [Entry(rel, mode, data) for rel, (data, mode) in files.items()]
        tarball.parent.mkdir(parents=True, exist_ok=True)
        tarball.write_bytes(layer_tar(entries))

    def summary(self, layout_dir: Path, tarball: Path) -> str:
        lines = [
            f"{self.name}: {self.ref}@{self.digest}",
            f"  manifest {self.manifest.digest} ({len(self.manifest.data)} bytes)",
            f"  config   {self.config.media_type} {self.config.digest} ({len(self.config.data)} bytes)",
        ]
        for layer in self.layers:
            lines.append(f"  layer    {layer.media_type} {layer.digest} ({len(layer.data)} bytes)")
        total = sum(len(b.data) for b in self.blobs())
        lines.append(f"  layout   {rel(layout_dir)} ({total} bytes of blobs)")
        lines.append(f"  tarball  {rel(tarball)} ({tarball.stat().st_size} bytes)")
        return "\n".join(lines)


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def cargo_version() -> str:
    import tomllib

    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def default_registry() -> str:
    return os.environ.get("ENVLANE_REGISTRY", "ghcr.io/envlane")


def check_wasm(module: bytes) -> None:
    if len(module) < 8 or module[:4] != b"\0asm":
        raise SystemExit("not a Wasm module (no \\0asm magic)")


def filter_image(module: bytes, variant: str = "compat", registry: str | None = None, version: str | None = None) -> Image:
    """The filter image; its digest depends only on the module bytes, the variant and the version."""
    check_wasm(module)
    registry = registry or default_registry()
    version = version or cargo_version()
    annotations = {
        "org.opencontainers.image.title": "envlane-filter",
        "org.opencontainers.image.description": "envlane proxy-wasm filter for Istio WasmPlugin",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "io.envlane.module.sha256": sha256_hex(module),
    }
    if variant == "compat":
        tar = layer_tar([Entry("plugin.wasm", 0o644, module)])
        layer = Blob(OCI_LAYER_GZIP, gzip_bytes(tar))
        config = Blob(
            OCI_CONFIG,
            canonical_json(
                {
                    "architecture": "wasm",
                    "os": "wasip1",
                    "config": {"Labels": {"org.opencontainers.image.version": version}},
                    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(tar)]},
                }
            ),
        )
        annotations["module.wasm.image/variant"] = "compat"
        layers = [layer]
    elif variant == "artifact":
        runtime = canonical_json(
            {"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"], "config": {"root_ids": []}}
        )
        config = Blob(WASM_CONFIG, runtime)
        layers = [
            Blob(WASM_CONFIG, runtime, {"org.opencontainers.image.title": "runtime-config.json"}),
            Blob(WASM_LAYER, module, {"org.opencontainers.image.title": "plugin.wasm"}),
        ]
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    name = "envlane-filter" if variant == "compat" else "envlane-filter-artifact"
    tag = version if variant == "compat" else f"{version}-artifact"
    return Image(name, f"{registry}/envlane-filter:{tag}", tag, config, layers, annotations)


# ELF e_machine -> OCI/Go architecture name.
ELF_ARCH = {62: "amd64", 183: "arm64"}


def elf_arch(binary: bytes) -> str | None:
    """The OCI architecture of a 64-bit little-endian ELF (None if unknown)."""
    if binary[:4] != b"\x7fELF" or binary[4] != 2 or binary[5] != 1:
        return None
    (machine,) = struct.unpack_from("<H", binary, 18)
    return ELF_ARCH.get(machine)


def elf_is_static(binary: bytes) -> tuple[bool, str]:
    """True when an x86-64 or aarch64 ELF executable has no program interpreter (PT_INTERP)."""
    if binary[:4] != b"\x7fELF":
        return False, "not an ELF file"
    if binary[4] != 2 or binary[5] != 1:
        return False, "not a 64-bit little-endian ELF"
    (machine,) = struct.unpack_from("<H", binary, 18)
    if machine not in ELF_ARCH:
        return False, f"ELF machine {machine} is neither x86-64 nor aarch64"
    phoff, = struct.unpack_from("<Q", binary, 32)
    phentsize, phnum = struct.unpack_from("<HH", binary, 54)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", binary, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader, which a scratch image lacks
            return False, "dynamically linked (has PT_INTERP)"
    return True, "static"


def sync_image(binary: bytes, registry: str | None = None, version: str | None = None) -> Image:
    ok, why = elf_is_static(binary)
    if not ok:
        raise SystemExit(f"envlane-sync binary is not usable in a scratch image: {why}")
    registry = registry or default_registry()
    version = version or cargo_version()
    arch = elf_arch(binary)
    uid = NONROOT_UID
    passwd = f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{uid}:{uid}:nonroot:/home/nonroot:/sbin/nologin\n"
    group = f"root:x:0:\nnonroot:x:{uid}:\n"
    tar = layer_tar(
        [
            Entry("etc/", 0o755),
            Entry("etc/passwd", 0o644, passwd.encode()),
            Entry("etc/group", 0o644, group.encode()),
            Entry("envlane-sync", 0o755, binary),
        ]
    )
    layer = Blob(OCI_LAYER_GZIP, gzip_bytes(tar))
    labels = {
        "org.opencontainers.image.title": "envlane-sync",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = Blob(
        OCI_CONFIG,
        canonical_json(
            {
                "architecture": arch,
                "os": "linux",
                "config": {
                    "User": f"{uid}:{uid}",
                    "Entrypoint": [SYNC_ENTRYPOINT],
                    "WorkingDir": "/",
                    "ExposedPorts": {f"{SYNC_PORT}/tcp": {}},
                    "Labels": labels,
                },
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(tar)]},
                "history": [{"created_by": "scripts/oci.py (static musl binary, no shell)"}],
            }
        ),
    )
    return Image("envlane-sync", f"{registry}/envlane-sync:{version}", version, config, [layer], labels)


@dataclass
class MultiArch:
    """Several single-platform images of one name under one OCI image index:
    what a registry serves for `name:tag`, each node pulling its platform's
    manifest. The layout's index.json names the image index (its digest is
    what the manifests pin)."""

    name: str
    ref: str
    tag: str
    images: list[Image]

    def platform(self, image: Image) -> dict:
        config = json.loads(image.config.data)
        return {"architecture": config["architecture"], "os": config["os"]}

    @property
    def index_blob(self) -> Blob:
        manifests = []
        for image in sorted(self.images, key=lambda i: self.platform(i)["architecture"]):
            desc = image.manifest.descriptor()
            desc["platform"] = self.platform(image)
            manifests.append(desc)
        return Blob(OCI_INDEX, canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))

    @property
    def digest(self) -> str:
        return self.index_blob.digest

    def files(self) -> dict[str, tuple[bytes, int]]:
        top = self.index_blob.descriptor()
        top["annotations"] = {"org.opencontainers.image.ref.name": self.tag}
        files: dict[str, tuple[bytes, int]] = {
            "oci-layout": (canonical_json({"imageLayoutVersion": "1.0.0"}), 0o644),
            "index.json": (canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}), 0o644),
            # docker-save style: one tag per platform (`docker load` has no multi-platform form).
            "manifest.json": (canonical_json([
                {"Config": "blobs/sha256/" + i.config.digest.split(":", 1)[1],
                 "RepoTags": [f"{self.ref}-{self.platform(i)['architecture']}"],
                 "Layers": ["blobs/sha256/" + b.digest.split(":", 1)[1] for b in i.layers]}
                for i in self.images
            ]), 0o644),
        }
        for blob in [self.index_blob, *(b for i in self.images for b in i.blobs())]:
            files["blobs/sha256/" + blob.digest.split(":", 1)[1]] = (blob.data, 0o644)
        return files

    # The same writer as a single image's.
    write = Image.write

    def summary(self, layout_dir: Path, tarball: Path) -> str:
        lines = [f"{self.name}: {self.ref}@{self.digest} (image index)"]
        for image in self.images:
            p = self.platform(image)
            lines.append(f"  {p['os']}/{p['architecture']:<6} manifest {image.digest} "
                         f"({sum(len(b.data) for b in image.blobs())} bytes)")
        lines.append(f"  layout   {rel(layout_dir)}")
        lines.append(f"  tarball  {rel(tarball)} ({tarball.stat().st_size} bytes)")
        return "\n".join(lines)


def sync_multiarch(binaries: dict[str, bytes], registry: str | None = None, version: str | None = None) -> MultiArch:
    """envlane-sync for several platforms: arch -> static binary of that arch."""
    images = []
    for arch, binary in sorted(binaries.items()):
        image = sync_image(binary, registry, version)
        got = json.loads(image.config.data)["architecture"]
        if got != arch:
            raise SystemExit(f"the {arch} binary is an {got} ELF")
        images.append(image)
    first = images[0]
    return MultiArch(first.name, first.ref, first.tag, images)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("filter", "digest"):
        p = sub.add_parser(name)
        p.add_argument("--wasm", type=Path, default=ROOT / "dist" / "envlane.wasm")
        p.add_argument("--variant", choices=["compat", "artifact"], default="compat")
    s = sub.add_parser("sync")
    s.add_argument("--binary", action="append", default=None,
                   help="PATH (one platform, from its ELF header), or ARCH=PATH once per platform (amd64, arm64): "
                        "a multi-arch image index (default: target/x86_64-unknown-linux-musl/release/envlane-sync)")
    for p in (sub.choices["filter"], s):
        p.add_argument("--out", type=Path, help="layout directory (default dist/oci/<name>)")
        p.add_argument("--tar", type=Path, help="tarball (default dist/<name>.oci.tar)")
    for p in sub.choices.values():
        p.add_argument("--registry", default=None, help="repository prefix (default $ENVLANE_REGISTRY or ghcr.io/envlane)")
        p.add_argument("--version", default=None, help="tag (default: the Cargo.toml version)")
    args = ap.parse_args(argv)

    if args.cmd == "digest":
        print(filter_image(args.wasm.read_bytes(), args.variant, args.registry, args.version).digest)
        return 0
    if args.cmd == "filter":
        image = filter_image(args.wasm.read_bytes(), args.variant, args.registry, args.version)
    else:
        specs = args.binary or [str(ROOT / "target" / "x86_64-unknown-linux-musl" / "release" / "envlane-sync")]
        paths: dict[str, Path] = {}
        for spec in specs:
            arch, sep, path = spec.partition("=")
            paths[arch if sep else ""] = Path(path if sep else spec)
        for path in paths.values():
            if not path.is_file():
                print(f"no envlane-sync binary at {path}", file=sys.stderr)
                return 1
        if list(paths) == [""]:
            image = sync_image(paths[""].read_bytes(), args.registry, args.version)
        else:
            if "" in paths or set(paths) - set(ELF_ARCH.values()):
                print(f"--binary ARCH=PATH with ARCH one of {sorted(ELF_ARCH.values())}", file=sys.stderr)
                return 2
            image = sync_multiarch({a: p.read_bytes() for a, p in paths.items()}, args.registry, args.version)
    layout = args.out or ROOT / "dist" / "oci" / image.name
    tarball = args.tar or ROOT / "dist" / f"{image.name}.oci.tar"
    image.write(layout, tarball)
    print(image.summary(layout, tarball))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
