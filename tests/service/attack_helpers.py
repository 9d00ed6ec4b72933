"""A real `pkvm-sim serve` subprocess for attack tests, and raw HTTP/2 frames to attack it
with (what a client without the gRPC library can send: no credentials needed)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

READY = re.compile(r"^pkvm-sim listening on 127\.0\.0\.1:(\d+)(?: with TLS)?"
                   r"(?: \(metrics on 127\.0\.0\.1:(\d+)\))?$")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PKVM_SIM_")}


class ServeProcess:
    """`pkvm-sim serve` on free loopback ports; stderr is collected by a thread (so a chatty
    server never blocks on a full pipe)."""

    def __init__(self, *extra: str, metrics: bool = False) -> None:
        metrics_listen = "127.0.0.1:0" if metrics else "off"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
             "--metrics-listen", metrics_listen, "--grace-seconds", "3", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        line = self.process.stdout.readline().strip()
        match = READY.match(line)
        if match is None:
            self.kill()
            raise AssertionError(f"bad ready line {line!r}; stderr: {self.stderr}")
        self.port = int(match.group(1))
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_port = int(match.group(2)) if match.group(2) else None

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert kib is not None
        return int(kib.group(1)) << 10

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


# -- raw HTTP/2 ------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEAD = struct.Struct(">3sBBI")  # length (24 bits), type, flags, stream id
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_HEADERS, ACK = 0x4, 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(len(payload).to_bytes(3, "big"), kind, flags, stream_id) + payload


def literal(name: str, value: str) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman (short)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def grpc_headers(method: str, authority: str) -> bytes:
    return b"".join(literal(name, value) for name, value in (
        (":method", "POST"), (":scheme", "http"), (":path", method),
        (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers"),
    ))


class RawH2:
    """One HTTP/2 connection speaking frames by hand; a reader thread records what the
    server sends (its SETTINGS, RST_STREAMs, GOAWAY, end of connection)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.server_settings: dict[int, int] = {}
        self.settings_seen = threading.Event()  # ... and in force
        self.refused: set[int] = set()
        self.reset: dict[int, int] = {}
        self.goaway = threading.Event()
        self.closed = threading.Event()
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= FRAME_HEAD.size:
                    raw_len, kind, flags, stream_id = FRAME_HEAD.unpack_from(buffer)
                    length = int.from_bytes(raw_len, "big")
                    if len(buffer) < FRAME_HEAD.size + length:
                        break
                    payload = buffer[FRAME_HEAD.size:FRAME_HEAD.size + length]
                    buffer = buffer[FRAME_HEAD.size + length:]
                    self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
        except OSError:
            pass
        self.closed.set()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for offset in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HI", payload, offset)
                self.server_settings[key] = value
            # ACK, then a PING: its answer proves the server has read the ACK, so that its
            # settings (the stream limit) are in force before the caller floods.
            self.send(frame(SETTINGS, ACK, 0) + frame(PING, 0, 0, b"settled!"))
        elif kind == RST_STREAM:
            (code,) = struct.unpack(">I", payload[:4])
            self.reset[stream_id] = code
            if code == REFUSED_STREAM:
                self.refused.add(stream_id)
        elif kind == PING and not flags & ACK:
            self.send(frame(PING, ACK, 0, payload))
        elif kind == PING and payload == b"settled!":
            self.settings_seen.set()
        elif kind == GOAWAY:
            self.goaway.set()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed.set()

    def open_streams(self, count: int, method: str, first_id: int = 1) -> list[int]:
        """HEADERS for `count` new streams, each left open with no body."""
        block = grpc_headers(method, f"127.0.0.1:{self.sock.getpeername()[1]}")
        ids = [first_id + 2 * i for i in range(count)]
        self.send(b"".join(frame(HEADERS, END_HEADERS, stream_id, block) for stream_id in ids))
        return ids

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self._reader.join(10)
