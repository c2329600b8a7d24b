"""Emulated nodes as Linux network namespaces: a :class:`Topology` (N namespaces, one bridge, one veth pair per
namespace), :func:`up` / :func:`down`, owner records for the lab's own topologies, and the clean-up of stale ones.

Layout: namespace k holds ``eth0`` (address ``<subnet>.<first + k>/24``), whose peer on the host is enslaved to the
bridge. The lab's names all carry a per-study id (``cnl`` + 5 base-36 characters of the owner's pid, so two live labs
never share one): bridge ``cnl<id>br``, namespaces ``cnl<id>n<k>``, host ends ``cnl<id>h<k>`` (at most 11
characters; Linux allows 15). The SLURM cluster (``slurm/local-cluster.sh``) uses the same code with its own names
(``slurm-n1``, ``vslurm1``, ``br-slurm``, 10.201.0.x), through this module's command line; nothing here ever touches
a name that does not start with the lab's prefix unless it is named explicitly.

Owners: before a lab makes anything it writes ``/run/cnnscale-lab/<id>.json`` (its names, the owner's pid and that
process's start time), and removes it after :func:`down`. :func:`clean_stale` removes the objects of every record
whose owner is dead (a SIGKILLed study), and lab-prefixed objects that no record claims; a live owner's are kept.

Command line (root)::

    python -m cnnscale.lab.netns clean                  # remove stale lab objects (dead owners), list what is left
    python -m cnnscale.lab.netns list                   # the lab objects there are now
    python -m cnnscale.lab.netns up --bridge br-slurm --bridge-addr 10.201.0.1/24 \\
        --node slurm-n1,vslurm1,10.201.0.11/24 --node slurm-n2,vslurm2,10.201.0.12/24   # idempotent
    python -m cnnscale.lab.netns down --bridge br-slurm --node slurm-n1,vslurm1,- --node slurm-n2,vslurm2,-

Pure stdlib. Costs: ``up`` is about 8 ``ip`` calls per namespace (~30 ms each on this machine), ``down`` 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cnnscale.errors import UserError, run_cli

__all__ = ["Topology", "lab_topology", "new_lab_id", "up", "down", "claim", "release", "clean_stale", "leftovers",
           "unavailable_reason", "PREFIX", "STATE_DIR", "INNER_IF", "main"]

PREFIX = "cnl"
STATE_DIR = Path("/run/cnnscale-lab")
INNER_IF = "eth0"
_LAB_NAME = re.compile(rf"^{PREFIX}([0-9a-z]{{5}})(br|n[0-9]+|h[0-9]+)$")
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Topology:
    """N namespaces on one bridge: ``namespaces[k]`` holds ``inner_if`` with ``addresses[k]`` (CIDR); its veth peer
    ``host_ifs[k]`` is on ``bridge``. ``lab_id`` is empty for a topology the lab does not own (SLURM's)."""

    bridge: str
    namespaces: tuple[str, ...]
    host_ifs: tuple[str, ...]
    addresses: tuple[str, ...]
    inner_if: str = INNER_IF
    bridge_addr: str = ""
    lab_id: str = ""

    @property
    def ips(self) -> tuple[str, ...]:
        """The namespaces' addresses without the prefix length."""
        return tuple(a.split("/")[0] for a in self.addresses)


def new_lab_id(pid: int | None = None) -> str:
    """5 base-36 characters of ``pid`` (this process's): unique among live processes (pids < 36**5)."""
    n, out = (os.getpid() if pid is None else pid) % 36**5, ""
    for _ in range(5):
        n, r = divmod(n, 36)
        out = _B36[r] + out
    return out


def lab_topology(n: int, lab_id: str) -> Topology:
    """The lab's topology of ``n`` namespaces for ``lab_id``: subnet 10.202.<id-derived>.0/24, addresses .11 ...
    (10.201.0.x is SLURM's, 10.206.6.x the multi-node test's)."""
    if not 1 <= n <= 200:
        raise UserError(f"a lab has 1 to 200 namespaces, not {n}")
    third = int(lab_id, 36) % 250 + 1
    base = f"{PREFIX}{lab_id}"
    return Topology(bridge=f"{base}br", namespaces=tuple(f"{base}n{k}" for k in range(n)),
                    host_ifs=tuple(f"{base}h{k}" for k in range(n)),
                    addresses=tuple(f"10.202.{third}.{11 + k}/24" for k in range(n)), lab_id=lab_id)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode:
        raise UserError(f"ip {' '.join(args)} failed: {res.stderr.strip() or res.returncode}")
    return res


def _has_link(name: str, netns: str | None = None) -> bool:
    return _ip(*(["-n", netns] if netns else []), "link", "show", name, check=False).returncode == 0


def _has_addr(dev: str, cidr: str, netns: str | None = None) -> bool:
    out = _ip(*(["-n", netns] if netns else []), "-4", "addr", "show", "dev", dev, check=False).stdout
    return f"inet {cidr} " in out or f"inet {cidr}\n" in out


def up(topo: Topology) -> None:
    """Make (or complete) ``topo``: what exists already is kept, so it is idempotent. Raises UserError naming the
    ``ip`` command that failed."""
    if not _has_link(topo.bridge):
        _ip("link", "add", topo.bridge, "type", "bridge")
    if topo.bridge_addr and not _has_addr(topo.bridge, topo.bridge_addr):
        _ip("addr", "add", topo.bridge_addr, "dev", topo.bridge)
    _ip("link", "set", topo.bridge, "up")
    for ns, host_if, addr in zip(topo.namespaces, topo.host_ifs, topo.addresses):
        if not Path(f"/run/netns/{ns}").exists():
            _ip("netns", "add", ns)
        if not _has_link(topo.inner_if, ns):
            _ip("link", "del", host_if, check=False)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", topo.inner_if, "netns", ns)
        _ip("link", "set", host_if, "master", topo.bridge, "up")
        if not _has_addr(topo.inner_if, addr, ns):
            _ip("-n", ns, "addr", "add", addr, "dev", topo.inner_if)
        _ip("-n", ns, "link", "set", topo.inner_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")


def down(topo: Topology) -> list[str]:
    """Remove ``topo``'s namespaces, veths (with their qdiscs) and bridge; absent ones are fine. Returns what was
    removed. A process still inside a deleted namespace keeps it alive until it exits (end the processes first)."""
    gone = []
    for ns, host_if in zip(topo.namespaces, topo.host_ifs):
        if Path(f"/run/netns/{ns}").exists() and _ip("netns", "del", ns, check=False).returncode == 0:
            gone.append(ns)
        if _has_link(host_if) and _ip("link", "del", host_if, check=False).returncode == 0:
            gone.append(host_if)
    if _has_link(topo.bridge) and _ip("link", "del", topo.bridge, check=False).returncode == 0:
        gone.append(topo.bridge)
    return gone


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def claim(topo: Topology, pid: int | None = None) -> Path:
    """Record this process (or ``pid``) as the owner of ``topo``, before anything of it is made."""
    pid = os.getpid() if pid is None else pid
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{topo.lab_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"owner_pid": pid, "owner_start": _start_time(pid), "topology": asdict(topo)}))
    os.replace(tmp, path)
    return path


def release(topo: Topology) -> None:
    """Forget ``topo``'s owner record (after :func:`down`)."""
    (STATE_DIR / f"{topo.lab_id}.json").unlink(missing_ok=True)


def _records() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            out.append((path, {}))
    return out


def leftovers() -> list[str]:
    """The lab-named namespaces and links there are now (every owner's)."""
    names = [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.strip()]
    links = _ip("-o", "link", "show", check=False).stdout.splitlines()
    names += [ln.split(":")[1].strip().split("@")[0] for ln in links if ":" in ln]
    return sorted({n for n in names if _LAB_NAME.match(n)})


def clean_stale() -> list[str]:
    """Remove the objects of labs whose owner is dead, and lab-named objects no owner record claims. Returns what
    was removed; a live owner's objects are never touched."""
    gone, live = [], set()
    for path, rec in _records():
        pid, start = rec.get("owner_pid"), rec.get("owner_start")
        alive = isinstance(pid, int) and start is not None and _start_time(pid) == start
        topo = rec.get("topology") or {}
        if alive:
            live.add(str(topo.get("lab_id", path.stem)))
            continue
        if topo:
            gone += down(Topology(**{k: tuple(v) if isinstance(v, list) else v for k, v in topo.items()}))
        path.unlink(missing_ok=True)
    for name in leftovers():
        lab_id = _LAB_NAME.match(name).group(1)
        if lab_id in live or (STATE_DIR / f"{lab_id}.json").exists():  # a live lab's (or one claimed meanwhile)
            continue
        if Path(f"/run/netns/{name}").exists():
            _ip("netns", "del", name, check=False)
        elif _has_link(name):
            _ip("link", "del", name, check=False)
        gone.append(name)
    return gone


def unavailable_reason() -> str | None:
    """Why a lab cannot run here (not root, no ip/tc, namespaces refused), or None. Cost: one namespace made and
    deleted (~20 ms)."""
    if os.geteuid() != 0:
        return "needs root (to make network namespaces and shape them with tc)"
    missing = [c for c in ("ip", "tc") if shutil.which(c) is None]
    if missing:
        return f"needs {' and '.join(missing)} on PATH (iproute2)"
    probe = f"{PREFIX}{new_lab_id()}n99"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode:
        return f"cannot make network namespaces: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _node(text: str) -> tuple[str, str, str]:
    parts = text.split(",")
    if len(parts) != 3:
        raise UserError(f"--node {text!r}: expected NAMESPACE,HOST_IF,ADDRESS/PREFIX (ADDRESS '-' for down)")
    return parts[0], parts[1], parts[2]


def main(argv: list[str]) -> int:
    """``python -m cnnscale.lab.netns {clean,list,up,down}`` (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m cnnscale.lab.netns", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["clean", "list", "up", "down"])
    ap.add_argument("--bridge", help="up/down: the bridge")
    ap.add_argument("--bridge-addr", default="", help="up: an address for the bridge itself (CIDR)")
    ap.add_argument("--node", action="append", default=[], type=_node, help="up/down: NAMESPACE,HOST_IF,ADDRESS")
    ap.add_argument("--inner-if", default=INNER_IF, help="the interface's name inside each namespace")
    args = ap.parse_args(argv)
    if args.action in ("up", "down"):
        if not args.bridge or not args.node:
            raise UserError(f"{args.action} needs --bridge and at least one --node")
        ns, hosts, addrs = zip(*args.node)
        topo = Topology(args.bridge, ns, hosts, addrs, args.inner_if, args.bridge_addr)
        if args.action == "up":
            up(topo)
        else:
            down(topo)
        return 0
    if os.geteuid() != 0:
        raise UserError("needs root")
    for name in clean_stale() if args.action == "clean" else []:
        print(f"removed {name}")
    for name in leftovers():
        print(f"left {name} (a live lab's)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="cnnscale.lab.netns"))
