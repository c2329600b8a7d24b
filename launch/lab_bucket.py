"""The lab's tbf bucket and GSO cap, before and after (root): what a shaped link delivers under each setting.

    sudo .venv/bin/python launch/lab_bucket.py [--profiles 200mbit,500mbit,2gbit] [--rounds 2]

Makes a 4-namespace lab (:class:`cnnscale.lab.session.LabSession`, removed on every way out) and, for each profile
and each setting, shapes every veth at both ends and measures with :func:`cnnscale.lab.link.measure`:
``msg/ideal``, the 256 KiB message after 20 ms idle (median of 8) over the time the rate implies (near 0: the
bucket lets it out at the veth's speed; ~1 or above: shaped); ``bulk``, one stream's bulk rate over the profile's
rate; ``ring``, the lowest and highest of 4 concurrent streams k -> k+1 (a ring all-reduce's traffic) over the rate.
Settings: ``old`` = the bucket before the fix (rate/100, at least 128 KiB, GSO packets left at 64 KiB); ``bkt`` =
the new bucket (:func:`cnnscale.lab.shape.burst_bytes`) with 64 KiB packets, the first fix alone; ``new`` = the new
bucket and the GSO cap (:func:`cnnscale.lab.shape.gso_bytes`). The settings alternate within each
round, so a slow moment of the box hits both. Cost: ~10 s per profile, setting and round.
"""

from __future__ import annotations

import argparse
import sys
import threading

from cnnscale.errors import run_cli
from cnnscale.lab import link
from cnnscale.lab.session import LabSession
from cnnscale.lab.shape import GSO_DEFAULT, burst_bytes, gso_bytes, parse_profile, shape_dev


def settings(rate_bps: float) -> dict[str, tuple[int, int]]:
    """(bucket bytes, GSO cap bytes) of each setting compared."""
    return {"old": (max(int(rate_bps / 8 / 100), 128 * 1024), GSO_DEFAULT),
            "bkt": (burst_bytes(rate_bps), GSO_DEFAULT), "new": (burst_bytes(rate_bps), gso_bytes(rate_bps))}


def ring(lab: LabSession, rate_Bps: float) -> list[float]:  # noqa: N803
    """Each of the lab's namespaces sends to the next at once: every stream's bulk rate over ``rate_Bps``."""
    topo, n = lab.topo, len(lab.topo.namespaces)
    got: list[float] = [0.0] * n
    errors: list[BaseException] = []

    def one(k: int) -> None:
        j = (k + 1) % n
        try:
            got[k] = link.measure(topo.namespaces[k], topo.namespaces[j], topo.ips[j], rate_Bps,
                                  port=5400 + k)["bandwidth_Bps"] / rate_Bps
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="launch/lab_bucket.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default="200mbit,500mbit,2gbit")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    profiles = [parse_profile(p) for p in args.profiles.split(",")]
    print(f"{'profile':8} {'set':4} {'bucket':>8} {'gso':>6} {'msg/ideal':>9} {'bulk':>5} {'ring':>10}")
    with LabSession(4, say=lambda _: None) as lab:
        topo = lab.topo
        for prof in profiles:
            for _ in range(args.rounds):
                for name, (burst, gso) in settings(prof.rate_bps).items():
                    for ns, host_if in zip(topo.namespaces, topo.host_ifs):
                        shape_dev(topo.inner_if, prof, ns, burst, gso)
                        shape_dev(host_if, prof, None, burst, gso)
                    two = link.measure(topo.namespaces[0], topo.namespaces[1], topo.ips[1], prof.rate_Bps)
                    ideal = two["message_bytes"] / prof.rate_Bps
                    r = ring(lab, prof.rate_Bps)
                    print(f"{prof.name:8} {name:4} {burst:8d} {gso:6d} {two['message_s'] / ideal:9.2f} "
                          f"{two['bandwidth_Bps'] / prof.rate_Bps:5.2f} {min(r):4.2f}..{max(r):4.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="launch/lab_bucket.py"))
