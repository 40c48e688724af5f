"""The Gateway API CRDs (standard channel) for an istiod with ambient on: the
version istiod's own go.mod pins (sigs.k8s.io/gateway-api, an indirect
dependency of istio.io/istio; release-1.31 pins v1.6.0), fetched from the Go
module proxy with `go mod download -json MODULE@VERSION`, its checksum
checked against istiod's go.sum, and the CRD files joined into one YAML file
cached under ${XDG_CACHE_HOME:-~/.cache}/envlane/gateway-api/VERSION-KEY/
(KEY: a hash of the module's go.sum line), as scripts/controlplane.sh caches
its binaries. Nothing is written inside the repo.

Building istiod (scripts/controlplane.sh) puts the module in the Go module
cache already, so this works offline, inside the e2e network namespace. On a
machine where it is not there yet, run this file once outside it:

    python3 integration/e2e/gateway_api.py     # prints the cached file's path
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ISTIOD_MODULE = REPO / "integration" / "controlplane" / "istiod"
MODULE = "sigs.k8s.io/gateway-api"
CHANNEL = "standard"


class GatewayApiError(RuntimeError):
    pass


def pinned() -> tuple[str, str]:
    """(version, h1 checksum) of the Gateway API module istiod's go.mod
    requires, the checksum from its go.sum."""
    gomod = (ISTIOD_MODULE / "go.mod").read_text()
    m = re.search(rf"^\s*{re.escape(MODULE)} (v\S+)", gomod, re.M)
    if not m:
        raise GatewayApiError(f"{MODULE} is not in {ISTIOD_MODULE / 'go.mod'}")
    version = m.group(1)
    gosum = (ISTIOD_MODULE / "go.sum").read_text()
    s = re.search(rf"^{re.escape(MODULE)} {re.escape(version)} (h1:\S+)$", gosum, re.M)
    if not s:
        raise GatewayApiError(f"{MODULE} {version} has no checksum in {ISTIOD_MODULE / 'go.sum'}")
    return version, s.group(1)


def cache_dir(version: str, checksum: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "envlane" / "gateway-api"
    return root / f"{version}-{hashlib.sha256(checksum.encode()).hexdigest()[:16]}"


def download(version: str, checksum: str) -> Path:
    """The module's directory (go mod download), its checksum checked."""
    env = dict(os.environ)
    env["GOFLAGS"] = ""  # no -mod=... outside a module
    r = subprocess.run(["go", "mod", "download", "-json", f"{MODULE}@{version}"], capture_output=True,
                       text=True, cwd="/", env=env, timeout=600)
    try:
        info = json.loads(r.stdout)
    except ValueError:
        info = {}
    if r.returncode != 0 or info.get("Error") or not info.get("Dir"):
        raise GatewayApiError(
            f"go mod download {MODULE}@{version} failed ({r.returncode}): {info.get('Error') or r.stderr.strip()}"
            " (inside the e2e network namespace there is no network: run"
            " `python3 integration/e2e/gateway_api.py` outside it once)")
    if info.get("Sum") != checksum:
        raise GatewayApiError(f"{MODULE}@{version}: checksum {info.get('Sum')}, istiod's go.sum says {checksum}")
    return Path(info["Dir"])


def crds() -> Path:
    """One YAML file with every CRD of the pinned release's standard channel
    (its ValidatingAdmissionPolicy is left out: not a CRD)."""
    version, checksum = pinned()
    out = cache_dir(version, checksum) / f"{CHANNEL}-crds.yaml"
    if out.is_file():
        return out
    src = download(version, checksum) / "config" / "crd" / CHANNEL
    docs = []
    for f in sorted(src.glob("gateway.networking.k8s.io_*.yaml")):
        text = f.read_text()
        if "\nkind: CustomResourceDefinition\n" not in text:
            continue
        docs.append(f"# {MODULE}@{version} config/crd/{CHANNEL}/{f.name}\n{text.strip()}\n")
    if not docs:
        raise GatewayApiError(f"no CRDs in {src}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("---\n".join(docs))
    tmp.replace(out)
    return out


def crd_names(path: Path) -> list[str]:
    """metadata.name of every CRD in the file (without a YAML parser: the
    files are generated, `metadata:` then an indented `name:`)."""
    return re.findall(r"^metadata:\n(?:  .*\n)*?  name: (\S+)$", path.read_text(), re.M)


if __name__ == "__main__":
    try:
        print(crds())
    except GatewayApiError as e:
        sys.exit(f"gateway_api.py: {e}")
