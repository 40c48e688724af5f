"""A minimal Envoy ADS (xDS v3) client over plaintext gRPC, standard library only.

Enough to ask istiod, on its plaintext xDS port (15010 in a cluster), for the
configuration a sidecar would get, without a real Envoy:

    with AdsStream("127.0.0.1:15010", node_id, metadata) as ads:
        clusters = ads.request(CLUSTER)          # list of (type_url, bytes)
        names = [resource_name(r) for _, r in clusters]

It speaks HTTP/2 with prior knowledge (h2c), gRPC framing and just the
protobuf wire format it needs; responses are decoded only as far as each
resource's name (field 1 of Cluster, Listener, RouteConfiguration and
ClusterLoadAssignment). HPACK is only encoded (literal fields, no Huffman);
headers and trailers that come back are skipped, so when istiod ends the
stream with an error the reason is in istiod's log, not here.
"""

from __future__ import annotations

import socket
import struct
import time

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

ADS_PATH = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

# HTTP/2 frame types and flags (RFC 9113).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BIG_WINDOW = 1 << 30


class XdsError(RuntimeError):
    pass


# -- protobuf wire format ----------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _str_field(num: int, s: str) -> bytes:
    return _len_field(num, s.encode())


def _value(v) -> bytes:
    """google.protobuf.Value"""
    if isinstance(v, bool):
        return _varint(4 << 3 | 0) + _varint(int(v))
    if isinstance(v, (int, float)):
        return _varint(2 << 3 | 1) + struct.pack("<d", float(v))
    if isinstance(v, str):
        return _str_field(3, v)
    if isinstance(v, dict):
        return _len_field(5, _struct(v))
    if isinstance(v, (list, tuple)):
        return _len_field(6, b"".join(_len_field(1, _value(x)) for x in v))
    if v is None:
        return _varint(1 << 3 | 0) + _varint(0)
    raise TypeError(f"cannot encode {type(v).__name__} in a protobuf Struct")


def _struct(d: dict) -> bytes:
    """google.protobuf.Struct: map<string, Value> fields = 1"""
    return b"".join(
        _len_field(1, _str_field(1, str(k)) + _len_field(2, _value(v))) for k, v in d.items()
    )


def encode_node(node_id: str, metadata: dict, cluster: str = "") -> bytes:
    """envoy.config.core.v3.Node: id=1, cluster=2, metadata=3, user_agent_name=6"""
    out = _str_field(1, node_id)
    if cluster:
        out += _str_field(2, cluster)
    out += _len_field(3, _struct(metadata))
    out += _str_field(6, "envoy")
    return out


def encode_request(node: bytes | None, type_url: str, names=(), version: str = "", nonce: str = "") -> bytes:
    """envoy.service.discovery.v3.DiscoveryRequest"""
    out = b""
    if version:
        out += _str_field(1, version)
    if node is not None:
        out += _len_field(2, node)
    for n in names:
        out += _str_field(3, n)
    out += _str_field(4, type_url)
    if nonce:
        out += _str_field(5, nonce)
    return out


def parse_fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _read_varint(buf, i)
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise XdsError(f"unsupported protobuf wire type {wt}")
        yield num, wt, val


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def decode_response(msg: bytes) -> dict:
    """envoy.service.discovery.v3.DiscoveryResponse, resources as (type_url, bytes)."""
    out = {"version_info": "", "type_url": "", "nonce": "", "resources": []}
    for num, _, val in parse_fields(msg):
        if num == 1:
            out["version_info"] = val.decode()
        elif num == 2:  # google.protobuf.Any
            any_type, any_val = "", b""
            for n2, _, v2 in parse_fields(val):
                if n2 == 1:
                    any_type = v2.decode()
                elif n2 == 2:
                    any_val = v2
            out["resources"].append((any_type, any_val))
        elif num == 4:
            out["type_url"] = val.decode()
        elif num == 5:
            out["nonce"] = val.decode()
    return out


def resource_name(resource: bytes) -> str:
    """Field 1 (a string) of Cluster, Listener, RouteConfiguration, ClusterLoadAssignment."""
    for num, wt, val in parse_fields(resource):
        if num == 1 and wt == 2:
            return val.decode()
    return ""


def endpoint_addresses(cla: bytes) -> list[str]:
    """"ip:port" of every endpoint in a ClusterLoadAssignment.

    ClusterLoadAssignment.endpoints=2 (LocalityLbEndpoints) .lb_endpoints=2
    (LbEndpoint) .endpoint=1 (Endpoint) .address=1 (Address) .socket_address=1
    (SocketAddress: address=2, port_value=3).
    """
    out = []

    def sub(buf: bytes, num: int):
        return [v for n, wt, v in parse_fields(buf) if n == num and wt == 2]

    for lle in sub(cla, 2):
        for lbe in sub(lle, 2):
            for ep in sub(lbe, 1):
                for addr in sub(ep, 1):
                    for sa in sub(addr, 1):
                        host, port = "", 0
                        for n, wt, v in parse_fields(sa):
                            if n == 2 and wt == 2:
                                host = v.decode()
                            elif n == 3 and wt == 0:
                                port = v
                        out.append(f"{host}:{port}")
    return out


# -- HTTP/2 + gRPC -----------------------------------------------------------

def _hpack_literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""

    def string(s: str) -> bytes:
        b = s.encode()
        return _hpack_int(len(b), 7) + b

    return b"\x00" + string(name) + string(value)


def _hpack_int(n: int, prefix: int) -> bytes:
    limit = (1 << prefix) - 1
    if n < limit:
        return bytes([n])
    out = bytearray([limit])
    n -= limit
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    out.append(n)
    return bytes(out)


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


class AdsStream:
    """One ADS stream (stream id 1) on one plaintext HTTP/2 connection."""

    def __init__(self, addr: str, node_id: str, metadata: dict, timeout: float = 30.0):
        host, _, port = addr.rpartition(":")
        self.addr = addr
        self.node = encode_node(node_id, metadata)
        self.timeout = timeout
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._buf = b""
        self._grpc = b""
        self._sent_node = False
        self.closed = False
        self.sock.sendall(
            PREFACE
            + _frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, BIG_WINDOW))  # INITIAL_WINDOW_SIZE
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", BIG_WINDOW))
        )
        headers = b"".join(_hpack_literal(k, v) for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", ADS_PATH),
            (":authority", addr),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "envlane-xds/0"),
        ))
        self.sock.sendall(_frame(HEADERS, END_HEADERS, 1, headers))

    def __enter__(self) -> "AdsStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.sendall(
                _frame(RST_STREAM, 0, 1, struct.pack(">I", 0x8))  # CANCEL
                + _frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0))
            )
        except OSError:
            pass
        self.sock.close()

    def send(self, type_url: str, names=(), version: str = "", nonce: str = "") -> None:
        node = None if self._sent_node else self.node
        self._sent_node = True
        msg = encode_request(node, type_url, names, version, nonce)
        grpc = b"\x00" + struct.pack(">I", len(msg)) + msg
        self.sock.sendall(_frame(DATA, 0, 1, grpc))

    def request(self, type_url: str, names=()) -> list[tuple[str, bytes]]:
        """Subscribe to type_url (optionally only these names), wait for the
        answer, ACK it, and return its resources as (type_url, bytes)."""
        self.send(type_url, names)
        deadline = time.monotonic() + self.timeout
        while True:
            resp = self.receive(deadline)
            if resp["type_url"] == type_url:
                self.send(type_url, names, resp["version_info"], resp["nonce"])
                return resp["resources"]
            # A push of another type we subscribed to earlier: ACK and go on.
            self.send(resp["type_url"], (), resp["version_info"], resp["nonce"])

    def wait_for(self, type_url: str, done, timeout: float | None = None) -> list[tuple[str, bytes]]:
        """Keep ACKing pushes until a response of type_url satisfies
        done(resources); return those resources. Call after request():
        istiod debounces changes, so a new Service can reach a connected
        proxy one push after the first answer."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            resp = self.receive(deadline)
            self.send(resp["type_url"], (), resp["version_info"], resp["nonce"])
            if resp["type_url"] == type_url and done(resp["resources"]):
                return resp["resources"]

    def receive(self, deadline: float) -> dict:
        """Next DiscoveryResponse on the stream."""
        while True:
            if len(self._grpc) >= 5:
                compressed, n = self._grpc[0], struct.unpack(">I", self._grpc[1:5])[0]
                if len(self._grpc) >= 5 + n:
                    if compressed:
                        raise XdsError("compressed gRPC message (not supported)")
                    msg, self._grpc = self._grpc[5:5 + n], self._grpc[5 + n:]
                    return decode_response(msg)
            if self.closed:
                raise XdsError(
                    f"istiod ended the ADS stream at {self.addr} (its reason is in istiod's log)"
                )
            self._read_frame(deadline)

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise XdsError(f"timed out waiting for istiod at {self.addr}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise XdsError(f"istiod closed the connection at {self.addr}")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_frame(self, deadline: float) -> None:
        head = self._read_exact(9, deadline)
        length = int.from_bytes(head[:3], "big")
        ftype, flags = head[3], head[4]
        stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
        payload = self._read_exact(length, deadline)
        if ftype == SETTINGS and not flags & ACK:
            self.sock.sendall(_frame(SETTINGS, ACK, 0))
        elif ftype == PING and not flags & ACK:
            self.sock.sendall(_frame(PING, ACK, 0, payload))
        elif ftype == DATA and stream == 1:
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            self._grpc += payload
            # Keep both windows wide open whatever istiod sends.
            if length:
                inc = struct.pack(">I", length)
                self.sock.sendall(_frame(WINDOW_UPDATE, 0, 0, inc) + _frame(WINDOW_UPDATE, 0, 1, inc))
            if flags & END_STREAM:
                self.closed = True
        elif ftype == HEADERS and stream == 1 and flags & END_STREAM:
            self.closed = True  # trailers: grpc-status (not decoded)
        elif ftype == RST_STREAM and stream == 1:
            self.closed = True
        elif ftype == GOAWAY:
            self.closed = True
