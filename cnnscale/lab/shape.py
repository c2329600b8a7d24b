"""Network profiles and the ``tc`` shaping that makes them: :class:`Profile`, :func:`parse_profile`, :func:`shape`.

A profile is ``unshaped`` or a rate in tc's syntax, ``<number><kbit|mbit|gbit>`` (``10gbit``, ``1gbit``,
``200mbit``); its name is what studies, point ids and file names carry. A shaped profile puts a token-bucket filter
(``tbf``) on BOTH ends of every veth of the lab: the namespace's egress (its ``eth0``) and the host side's egress
(the bridge's way into the namespace), so each emulated node has an uplink and a downlink of the profile's rate, like
a port of a switch. ``netem`` is not available here, so no propagation delay is added: the profiles emulate bandwidth
only, and :mod:`cnnscale.lab.link` measures what the shaped link really delivers (its round trip included).

The bucket (``burst``) is what the link lets out at the veth's own speed after it has rested, so it must be small
beside the messages a step sends: a real link has none. :func:`burst_bytes` holds :data:`BURST_S` (0.5 ms) of
traffic, at least :data:`MIN_BURST` (16 KiB), and :func:`gso_bytes` caps the device's GSO packets at two thirds of
the bucket (``ip link set ... gso_max_size``; 64 KiB, the default, from 1gbit up): tbf cuts a packet larger than
its bucket into segments, and on this 2-core box that work collapses concurrent streams. ``launch/lab_bucket.py``
measures the settings side by side (a 256 KiB message after 20 ms idle against the time the rate implies; bulk and
4-stream ring rates); on the idle box, 2 rounds: the earlier bucket (rate/100, at least 128 KiB) let that message
out in 0.14-0.24 of its time at 200mbit and 500mbit, so the lab's LeNet-5 (a 248 KB gradient) did not slow with the
link; the 0.5 ms bucket takes 1.02-1.11 of it; with 64 KiB packets a 4-stream ring at 500mbit then fell to
0.41-0.62 of the rate, and the GSO cap gives 0.91-0.95 (200mbit 0.94-0.95, 2gbit 0.89-0.95).
The queue holds ``latency`` (25 ms) of traffic. The link's figures are measured at every lab, not
assumed: TCP delivers ~95% of the rate in bulk (frame headers, the bucket's timer); the unshaped veth gives ~4.8
Gbit/s to one Python stream on this 2-core machine, so profiles above a few gbit are not what limits a point here.
Pure stdlib; each shaping is 2N ``tc`` and 2N ``ip`` calls (a few ms each).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from cnnscale.errors import UserError

__all__ = ["Profile", "parse_profile", "PROFILE_FORMS", "UNSHAPED", "burst_bytes", "tbf_args", "shape_dev",
           "unshape_dev", "QDISC", "BURST_S", "MIN_BURST", "gso_bytes", "GSO_DEFAULT"]

UNSHAPED = "unshaped"
QDISC = "tbf"
BURST_S = 0.5e-3
"""Seconds of traffic the tbf bucket holds (see the module docstring)."""
LATENCY_MS = 25
MIN_BURST = 16 * 1024
GSO_DEFAULT = 65536
"""A device's default ``gso_max_size``, restored when a profile is taken off."""
PROFILE_FORMS = "unshaped, or a tc rate <number><kbit|mbit|gbit> such as 10gbit, 1gbit, 200mbit"
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(kbit|mbit|gbit)$")
_MIN_BPS, _MAX_BPS = 8e3, 400e9


@dataclass(frozen=True)
class Profile:
    """A network profile: its name, and its rate in bits per second (None: unshaped)."""

    name: str
    rate_bps: float | None

    @property
    def shaped(self) -> bool:
        return self.rate_bps is not None

    @property
    def rate_Bps(self) -> float | None:  # noqa: N802 (bytes per second, as the records spell it)
        return None if self.rate_bps is None else self.rate_bps / 8


def parse_profile(text: object) -> Profile:
    """The profile named ``text`` (``unshaped``, ``10gbit``, ``200mbit``, ``1.5gbit``...). Anything else is a
    one-line UserError naming the valid forms."""
    name = str(text).strip()
    if name == UNSHAPED:
        return Profile(UNSHAPED, None)
    m = _RATE.match(name)
    if not isinstance(text, str) or m is None:
        raise UserError(f"unknown network profile {str(text)[:60]!r} (valid forms: {PROFILE_FORMS})")
    rate = float(m.group(1)) * _UNITS[m.group(2)]
    if not _MIN_BPS <= rate <= _MAX_BPS:
        raise UserError(f"network profile {name!r}: the rate must be between 8kbit and 400gbit "
                        f"(valid forms: {PROFILE_FORMS})")
    return Profile(name, rate)


def burst_bytes(rate_bps: float) -> int:
    """The tbf bucket for ``rate_bps``: :data:`BURST_S` of traffic, at least :data:`MIN_BURST` bytes."""
    return max(int(rate_bps / 8 * BURST_S), MIN_BURST)


def gso_bytes(rate_bps: float) -> int:
    """The ``gso_max_size`` a shaped device gets: two thirds of the bucket, at most the default."""
    return min(GSO_DEFAULT, burst_bytes(rate_bps) * 2 // 3)


def tbf_args(profile: Profile, burst: int | None = None) -> list[str]:
    """``tc qdisc replace dev X root`` + these: the tbf of a shaped profile (rate in bit/s, burst in bytes:
    :func:`burst_bytes` unless ``burst`` is given)."""
    if profile.rate_bps is None:
        raise ValueError("an unshaped profile has no tbf")
    burst = burst_bytes(profile.rate_bps) if burst is None else burst
    return [QDISC, "rate", f"{int(profile.rate_bps)}bit", "burst", str(burst), "latency", f"{LATENCY_MS}ms"]


def _run(tool: str, netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``tc`` or ``ip`` (in ``netns`` with ``-n``); a failure is a UserError naming the command when ``check``."""
    cmd = [tool, *(["-n", netns] if netns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode:
        raise UserError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")
    return res


def shape_dev(dev: str, profile: Profile, netns: str | None = None, burst: int | None = None,
              gso: int | None = None) -> None:
    """Put ``profile`` on the egress of ``dev`` (in ``netns``, or the host's): tbf for a shaped profile, with GSO
    packets capped (:func:`gso_bytes`), the device's defaults for ``unshaped``. ``burst`` and ``gso`` override the
    bucket and the cap (launch/lab_bucket.py compares settings with them). Raises UserError when tc or ip refuses."""
    if profile.shaped:
        gso = gso_bytes(profile.rate_bps) if gso is None else gso
        _run("ip", netns, "link", "set", "dev", dev, "gso_max_size", str(gso))
        _run("tc", netns, "qdisc", "replace", "dev", dev, "root", *tbf_args(profile, burst))
    else:
        unshape_dev(dev, netns)


def unshape_dev(dev: str, netns: str | None = None) -> None:
    """Remove any root qdisc of ``dev`` (none there is fine) and give it back the default GSO packet size."""
    _run("tc", netns, "qdisc", "del", "dev", dev, "root", check=False)
    _run("ip", netns, "link", "set", "dev", dev, "gso_max_size", str(GSO_DEFAULT), check=False)
