"""A real Kubernetes control plane and istiod on loopback, for tests.

    with ControlPlane() as cp:
        cp.kubectl("get", "ns")
        cp.api("GET", "/api/v1/namespaces")
        cp.istiod_get("/debug/registryz")

Starts, each on a free 127.0.0.1 port, in a fresh temp dir:

* etcd (one member, no fsync: test data only);
* kube-apiserver with RBAC, TLS from a throwaway CA, an admin client
  certificate (group system:masters), a service-account signing key and a
  service CIDR; no kubelet, no controller-manager, no scheduler;
* Istio's CRDs (``<repo>/../shared/istio/crds.gen.yaml``) applied with kubectl;
* istiod (``pilot-discovery discovery``) against that API server through the
  admin kubeconfig, with its CA, its TLS listeners and its webhooks off.

Binaries come from ``scripts/controlplane.sh build`` (the environment
variables ENVLANE_ETCD, ENVLANE_KUBE_APISERVER, ENVLANE_KUBECTL and
ENVLANE_PILOT_DISCOVERY override them). Every process is stopped on close;
each one's log is kept in the temp dir and printed when something fails
(the temp dir is then kept too, and its path printed).

Standard library only (plus the ``openssl`` command for the keys and
certificates). Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CRDS = REPO.parent / "shared" / "istio" / "crds.gen.yaml"

BINARIES = ("etcd", "kube-apiserver", "kubectl", "pilot-discovery")
SERVICE_CIDR = "10.96.0.0/16"
DOMAIN = "cluster.local"
ISTIO_NAMESPACE = "istio-system"
# etcd's data directory inside the work dir.
ETCD_DATA = "etcd-data"


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binaries() -> dict[str, str]:
    """Paths of the four binaries: env overrides, else the build cache."""
    paths: dict[str, str] = {}
    env_names = {b: "ENVLANE_" + b.upper().replace("-", "_") for b in BINARIES}
    if not all(os.environ.get(v) for v in env_names.values()):
        script = REPO / "scripts" / "controlplane.sh"
        out = subprocess.run(
            ["bash", str(script), "paths"], check=True, capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            name, _, path = line.partition(" ")
            paths[name] = path
    for b, var in env_names.items():
        if os.environ.get(var):
            paths[b] = os.environ[var]
    missing = [f"{b} ({paths.get(b)})" for b in BINARIES if not os.access(paths.get(b, ""), os.X_OK)]
    if missing:
        raise ControlPlaneError(
            "not built: " + ", ".join(missing) + "; run: scripts/controlplane.sh build"
        )
    return paths


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if this Python process dies first."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path):
        self.name = name
        self.argv = argv
        self.log = log
        self._logf = open(log, "ab")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._logf.close()


class ControlPlane:
    """etcd + kube-apiserver + istiod on loopback. Use as a context manager."""

    def __init__(
        self,
        *,
        istiod: bool = True,
        crds: Path | str | None = DEFAULT_CRDS,
        binaries: dict[str, str] | None = None,
        keep: bool = False,
        verbose: bool = True,
        istiod_env: dict[str, str] | None = None,
        mesh_config: str = "",
    ):
        self.want_istiod = istiod
        self.crds = Path(crds) if crds else None
        self.bin = binaries or find_binaries()
        self.keep = keep or os.environ.get("ENVLANE_CONTROLPLANE_KEEP") == "1"
        self.verbose = verbose
        self.istiod_env = istiod_env or {}
        self.mesh_config = mesh_config
        self.dir: Path | None = None
        self.procs: list[_Proc] = []
        self.ports: dict[str, int] = {}
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self.timings: dict[str, float] = {}

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"[controlplane] {msg}", file=sys.stderr, flush=True)

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="envlane-controlplane-"))
        self._say(f"work dir {self.dir}")
        t0 = time.monotonic()
        self._make_pki()
        self._start_etcd()
        self.timings["etcd"] = time.monotonic() - t0
        t = time.monotonic()
        self._start_apiserver()
        self.timings["kube-apiserver"] = time.monotonic() - t
        self._write_kubeconfig()
        if self.crds:
            t = time.monotonic()
            self._apply_crds()
            self.timings["crds"] = time.monotonic() - t
        if self.want_istiod:
            t = time.monotonic()
            self._start_istiod()
            self.timings["istiod"] = time.monotonic() - t
        self.timings["total"] = time.monotonic() - t0
        self._say(
            "ready in "
            + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        )

    def close(self, failed: bool = False) -> None:
        if failed:
            self.print_logs()
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        if self.dir and self.dir.exists():
            if self.keep:
                print(f"[controlplane] kept {self.dir}", file=sys.stderr, flush=True)
            elif failed:
                # Logs and configs are what a failure is read from; etcd's
                # data (a preallocated 64 MB WAL) is not, and kept after
                # every failed run it fills a disk.
                shutil.rmtree(self.dir / ETCD_DATA, ignore_errors=True)
                print(f"[controlplane] kept {self.dir} (logs; etcd data removed, "
                      "ENVLANE_CONTROLPLANE_KEEP=1 keeps it)", file=sys.stderr, flush=True)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)

    def print_logs(self, lines: int = 80) -> None:
        for p in self.procs:
            try:
                text = p.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            state = "running" if p.alive() else f"exited {p.popen.returncode}"
            print(
                f"----- {p.name} ({state}), last {lines} lines of {p.log} -----",
                file=sys.stderr,
            )
            for line in text[-lines:]:
                print(line, file=sys.stderr)
        sys.stderr.flush()

    # -- helpers -----------------------------------------------------------

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(argv, **kw)
        if r.returncode != 0:
            raise ControlPlaneError(
                f"command failed ({r.returncode}): {' '.join(argv)}\n{r.stdout}{r.stderr}"
            )
        return r

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Proc:
        assert self.dir
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
        }
        full_env.update(env or {})
        log = self.dir / f"{name}.log"
        (self.dir / f"{name}.cmd").write_text(
            "".join(f"{k}={v}\n" for k, v in (env or {}).items()) + " ".join(argv) + "\n"
        )
        p = _Proc(name, argv, log, full_env, self.dir)
        self.procs.append(p)
        return p

    def _wait(self, what: str, check, timeout: float, proc: _Proc | None = None):
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise ControlPlaneError(
                    f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}"
                )
            try:
                result = check()
                if result:
                    return result
            except Exception as e:  # noqa: BLE001 - report the last one
                last = e
            time.sleep(0.25)
        raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}: {last!r}")

    # -- PKI ---------------------------------------------------------------

    def _make_pki(self) -> None:
        assert self.dir
        pki = self.dir / "pki"
        pki.mkdir()
        o = shutil.which("openssl")
        if not o:
            raise ControlPlaneError("openssl not found (apt-get install openssl)")

        def key(name: str) -> Path:
            p = pki / f"{name}.key"
            self._run([o, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(p)])
            return p

        ca_key = key("ca")
        self._run([
            o, "req", "-x509", "-new", "-key", str(ca_key), "-out", str(pki / "ca.crt"),
            "-days", "3", "-subj", "/CN=envlane-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])

        def leaf(name: str, subj: str, ext: str) -> None:
            k = key(name)
            csr = pki / f"{name}.csr"
            self._run([o, "req", "-new", "-key", str(k), "-out", str(csr), "-subj", subj])
            extfile = pki / f"{name}.ext"
            extfile.write_text(ext)
            self._run([
                o, "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
                "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(pki / f"{name}.crt"),
                "-days", "3", "-extfile", str(extfile),
            ])

        leaf(
            "apiserver",
            "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,"
            "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            f"DNS:kubernetes.default.svc.{DOMAIN}\n",
        )
        leaf(
            "admin",
            "/O=system:masters/CN=envlane-admin",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n",
        )
        sa = key("sa")
        self._run([o, "pkey", "-in", str(sa), "-pubout", "-out", str(pki / "sa.pub")])
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._ssl = ctx
        self.pki = pki

    # -- etcd --------------------------------------------------------------

    def _start_etcd(self) -> None:
        assert self.dir
        client, peer = free_port(), free_port()
        self.ports["etcd"] = client
        self.etcd_url = f"http://127.0.0.1:{client}"
        p = self._spawn("etcd", [
            self.bin["etcd"],
            "--name", "envlane",
            "--data-dir", str(self.dir / ETCD_DATA),
            "--listen-client-urls", self.etcd_url,
            "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"envlane=http://127.0.0.1:{peer}",
            "--initial-cluster-state", "new",
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        self._wait("etcd /health", healthy, 60, p)
        self._say(f"etcd on {self.etcd_url}")

    # -- kube-apiserver ----------------------------------------------------

    def _start_apiserver(self, port: int | None = None) -> None:
        assert self.dir
        port = port or free_port()
        self.ports["kube-apiserver"] = port
        self.server = f"https://127.0.0.1:{port}"
        pki = self.pki
        p = self._spawn("kube-apiserver", [
            self.bin["kube-apiserver"],
            "--etcd-servers", self.etcd_url,
            "--bind-address", "127.0.0.1",
            "--advertise-address", "127.0.0.1",
            "--secure-port", str(port),
            "--cert-dir", str(self.dir / "apiserver-certs"),
            "--tls-cert-file", str(pki / "apiserver.crt"),
            "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", f"https://kubernetes.default.svc.{DOMAIN}",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            # The "kubernetes" Service's endpoints would be 127.0.0.1, which
            # Endpoints validation rejects; nothing here needs them.
            "--endpoint-reconciler-type", "none",
            "--profiling=false",
        ])

        def ready() -> bool:
            return self._get_text("/readyz") == "ok"

        self._wait("kube-apiserver /readyz", ready, 180, p)
        self._say(f"kube-apiserver on {self.server}")

    def restart_apiserver(self, while_down=None) -> None:
        """Stops kube-apiserver (every watch on it ends), runs `while_down`,
        starts it again on the same port and waits for /readyz."""
        (old,) = [p for p in self.procs if p.name == "kube-apiserver"]
        # Its graceful shutdown waits out open watches (15 s and more here);
        # a crash-like stop is what a restart test wants anyway.
        old.stop(timeout=2)
        self.procs.remove(old)
        if while_down is not None:
            while_down()
        self._start_apiserver(self.ports["kube-apiserver"])

    def etcd_compact(self) -> int:
        """Compacts etcd's history up to its current revision (what etcd does
        on its own over time): every watch from an older resourceVersion is
        then answered 410 Gone. Returns the revision."""
        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(
                self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.load(r)

        rev = int(post("/v3/kv/range", {"key": "AA==", "limit": 1})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def _write_kubeconfig(self) -> None:
        assert self.dir
        pki = self.pki
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "envlane", "cluster": {
                "server": self.server,
                "certificate-authority": str(pki / "ca.crt"),
            }}],
            "users": [{"name": "envlane-admin", "user": {
                "client-certificate": str(pki / "admin.crt"),
                "client-key": str(pki / "admin.key"),
            }}],
            "contexts": [{"name": "envlane", "context": {"cluster": "envlane", "user": "envlane-admin"}}],
            "current-context": "envlane",
        }
        self.kubeconfig = self.dir / "kubeconfig"
        # JSON is YAML; kubectl and client-go read it as such.
        self.kubeconfig.write_text(json.dumps(cfg, indent=2) + "\n")

    # -- API access --------------------------------------------------------

    def _request(self, method: str, path: str, body=None, content_type: str = "application/json"):
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        return urllib.request.urlopen(req, context=self._ssl, timeout=30)

    def _get_text(self, path: str) -> str:
        with self._request("GET", path) as r:
            return r.read().decode()

    def api(self, method: str, path: str, body=None, content_type: str = "application/json"):
        """One API call as the admin; returns the decoded JSON answer."""
        try:
            with self._request(method, path, body, content_type) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise ControlPlaneError(
                f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}"
            ) from None
        return json.loads(raw) if raw else None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = [self.bin["kubectl"], "--kubeconfig", str(self.kubeconfig), *args]
        r = subprocess.run(argv, input=input, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
            )
        return r

    def _apply_crds(self) -> None:
        assert self.crds
        if not self.crds.is_file():
            raise ControlPlaneError(f"Istio CRDs not found: {self.crds}")
        # Server-side apply: no last-applied-configuration annotation (a
        # second copy of every large CRD), and the API server does the merge.
        self.kubectl("apply", "--server-side", "--field-manager", "envlane", "-f", str(self.crds))
        # Polled here, not `kubectl wait --for condition=Established crd --all`:
        # that fails outright ("status.conditions accessor error: <nil>") on a
        # CRD the API server has not given conditions yet.
        def established() -> int:
            crds = self.api("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]
            ok = all(
                any(c["type"] == "Established" and c["status"] == "True"
                    for c in crd.get("status", {}).get("conditions") or [])
                for crd in crds
            )
            return len(crds) if ok and crds else 0

        n = self._wait("Istio CRDs Established", established, 120)
        self._say(f"applied Istio CRDs ({n} established)")

    # -- istiod ------------------------------------------------------------

    def _start_istiod(self) -> None:
        assert self.dir
        self.api("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ISTIO_NAMESPACE},
        })
        http, grpc, mon = free_port(), free_port(), free_port()
        self.ports.update({"istiod-http": http, "istiod-grpc": grpc, "istiod-monitoring": mon})
        self.istiod_url = f"http://127.0.0.1:{http}"
        self.istiod_grpc = f"127.0.0.1:{grpc}"
        mesh = self.dir / "mesh.yaml"
        mesh.write_text(
            f"rootNamespace: {ISTIO_NAMESPACE}\n"
            f"trustDomain: {DOMAIN}\n"
            "defaultConfig:\n"
            f"  discoveryAddress: 127.0.0.1:{grpc}\n"
            + self.mesh_config
        )
        env = {
            "POD_NAME": "istiod-envlane",
            "POD_NAMESPACE": ISTIO_NAMESPACE,
            "KUBECONFIG": str(self.kubeconfig),
            "REVISION": "default",
            "CLUSTER_ID": "Kubernetes",
            # No CA, no istiod TLS certificates, no webhooks to patch.
            "ENABLE_CA_SERVER": "false",
            "PILOT_CERT_PROVIDER": "none",
            "INJECTION_WEBHOOK_CONFIG_NAME": "",
            "VALIDATION_WEBHOOK_CONFIG_NAME": "",
            "PILOT_ENABLE_ANALYSIS": "false",
            "ENABLE_DEBUG_ON_HTTP": "true",
        }
        env.update(self.istiod_env)
        p = self._spawn("istiod", [
            self.bin["pilot-discovery"], "discovery",
            "--kubeconfig", str(self.kubeconfig),
            "--meshConfig", str(mesh),
            "--networksConfig", str(self.dir / "meshNetworks.yaml"),
            "--domain", DOMAIN,
            "--clusterID", "Kubernetes",
            "--httpAddr", f"127.0.0.1:{http}",
            "--grpcAddr", self.istiod_grpc,
            "--secureGRPCAddr", "",
            "--httpsAddr", "",
            "--monitoringAddr", f"127.0.0.1:{mon}",
            "--caCertFile", "",
            "--log_output_level", "default:info",
        ], env)

        def ready() -> bool:
            with urllib.request.urlopen(self.istiod_url + "/ready", timeout=2) as r:
                return r.status == 200

        self._wait("istiod /ready", ready, 180, p)
        self._say(f"istiod on {self.istiod_url} (xDS {self.istiod_grpc})")

    def istiod_get(self, path: str):
        """GET an istiod HTTP (debug) path; JSON decoded when it is JSON."""
        with urllib.request.urlopen(self.istiod_url + path, timeout=30) as r:
            raw = r.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `with ControlPlane()` cleans up."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    # Start everything, print where it is, and wait for Ctrl-C (or SIGTERM).
    _interrupt_on_sigterm()
    with ControlPlane(keep="--keep" in sys.argv) as cp:
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f"# istiod http {cp.istiod_url}  xds {cp.istiod_grpc}")
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.alive() for p in cp.procs):
                time.sleep(1)
