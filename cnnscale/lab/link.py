"""What a (shaped) link between two namespaces really delivers: a TCP bulk transfer, a step-sized message after an
idle gap, and a small-message round trip, with stdlib sockets, between the processes ``serve`` (in one namespace)
and ``client`` (in the other).

:func:`measure` runs both under ``ip netns exec`` and returns ``{"bandwidth_Bps", "rtt_s", "bytes", "seconds",
"message_bytes", "message_s", "message_Bps"}``: ``rtt_s`` is the median of :data:`PINGS` round trips of a 64-byte
message (no added delay exists here: netem is missing, so this is the stack's own latency, queueing included);
``message_s`` is the median time of :data:`MESSAGES` sends of :data:`MESSAGE_BYTES` (256 KiB, about LeNet-5's
gradient), each after :data:`GAP_S` idle and answered by one byte: what a small all-reduce meets once the link has
rested for a compute phase, so a token bucket that lets such a message out at the veth's speed shows here and not in
the bulk figure; ``bandwidth_Bps`` is the bytes of one bulk send (at least 16 MiB; more at high rates, so the
bucket's first burst is a small share) over the time to the receiver's acknowledgement. Cost: about bytes / rate +
0.5 s of two Python processes.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

from cnnscale.errors import UserError, run_cli

__all__ = ["measure", "bulk_bytes", "serve", "client", "PINGS", "MIN_BULK", "MESSAGES", "MESSAGE_BYTES", "GAP_S",
           "FIELDS"]

PINGS = 50
MESSAGES = 8
MESSAGE_BYTES = 256 * 1024
GAP_S = 0.02
MIN_BULK = 16 * 2**20
MAX_BULK = 256 * 2**20
_CHUNK = 2**20
FIELDS = ("bandwidth_Bps", "rtt_s", "bytes", "seconds", "message_bytes", "message_s", "message_Bps")
"""What :func:`measure` returns (and env.json's ``network.measured`` holds)."""
_MSG = 64


def bulk_bytes(rate_Bps: float | None) -> int:  # noqa: N803
    """Bytes of the bulk transfer: a quarter second at the rate, between 16 and 256 MiB (unshaped: 256 MiB)."""
    if rate_Bps is None:
        return MAX_BULK
    return int(min(max(rate_Bps / 4, MIN_BULK), MAX_BULK)) // _CHUNK * _CHUNK


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed the connection")
        buf += part
    return bytes(buf)


def serve(bind: str, port: int, nbytes: int, timeout_s: float = 60.0) -> None:
    """Accept one client: echo :data:`PINGS` messages, then read ``nbytes`` and answer one byte."""
    with socket.create_server((bind, port)) as srv:
        srv.settimeout(timeout_s)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(PINGS):
                conn.sendall(_recv_exact(conn, _MSG))
            for _ in range(MESSAGES):
                _recv_exact(conn, MESSAGE_BYTES)
                conn.sendall(b"k")
            left, view = nbytes, memoryview(bytearray(_CHUNK))
            while left:
                got = conn.recv_into(view[:min(left, _CHUNK)])
                if not got:
                    raise ConnectionError("peer closed the connection mid-transfer")
                left -= got
            conn.sendall(b"k")


def client(host: str, port: int, nbytes: int, timeout_s: float = 60.0) -> dict[str, float]:
    """Connect (retrying while the server starts), time the round trips and the bulk send; the figures."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=timeout_s)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts, msg = [], b"x" * _MSG
        for _ in range(PINGS):
            t = time.perf_counter()
            conn.sendall(msg)
            _recv_exact(conn, _MSG)
            rtts.append(time.perf_counter() - t)
        sends, message = [], b"\0" * MESSAGE_BYTES
        for _ in range(MESSAGES):
            time.sleep(GAP_S)
            t = time.perf_counter()
            conn.sendall(message)
            _recv_exact(conn, 1)
            sends.append(time.perf_counter() - t)
        chunk, left = b"\0" * _CHUNK, nbytes
        t = time.perf_counter()
        while left:
            conn.sendall(chunk[:min(left, _CHUNK)])
            left -= min(left, _CHUNK)
        _recv_exact(conn, 1)
        seconds = time.perf_counter() - t
    message_s = statistics.median(sends)
    return {"bandwidth_Bps": nbytes / seconds, "rtt_s": statistics.median(rtts), "bytes": nbytes,
            "seconds": seconds, "message_bytes": MESSAGE_BYTES, "message_s": message_s,
            "message_Bps": MESSAGE_BYTES / message_s}


def measure(ns_a: str, ns_b: str, addr_b: str, rate_Bps: float | None, port: int = 5201,  # noqa: N803
            timeout_s: float = 120.0) -> dict[str, float]:
    """Measure the link from namespace ``ns_a`` to ``ns_b`` (listening on ``addr_b``); see the module docstring.
    Raises UserError when either side fails."""
    nbytes = bulk_bytes(rate_Bps)
    me = [sys.executable, "-m", "cnnscale.lab.link"]
    common = ["--port", str(port), "--bytes", str(nbytes)]
    srv = subprocess.Popen(["ip", "netns", "exec", ns_b, *me, "serve", "--host", addr_b, *common],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cli = subprocess.run(["ip", "netns", "exec", ns_a, *me, "client", "--host", addr_b, *common],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
        srv_err = srv.communicate(timeout=timeout_s)[1]
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    if cli.returncode or srv.returncode:
        raise UserError(f"link measurement {ns_a} -> {ns_b} failed: {(cli.stderr or srv_err).strip()[-300:]}")
    return json.loads(cli.stdout)


def main(argv: list[str]) -> int:
    """``python -m cnnscale.lab.link {serve,client} --host ADDR --port P --bytes N``."""
    ap = argparse.ArgumentParser(prog="python -m cnnscale.lab.link", description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=["serve", "client"])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=5201)
    ap.add_argument("--bytes", type=int, default=MIN_BULK)
    args = ap.parse_args(argv)
    try:
        if args.role == "serve":
            serve(args.host, args.port, args.bytes)
        else:
            print(json.dumps(client(args.host, args.port, args.bytes)))
    except OSError as exc:
        raise UserError(f"{args.role}: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="cnnscale.lab.link"))
