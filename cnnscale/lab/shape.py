"""Network profiles and the ``tc`` shaping that makes them: :class:`Profile`, :func:`parse_profile`, :func:`shape`.

A profile is ``unshaped`` or a rate in tc's syntax, ``<number><kbit|mbit|gbit>`` (``10gbit``, ``1gbit``,
``200mbit``); its name is what studies, point ids and file names carry. A shaped profile puts a token-bucket filter
(``tbf``) on BOTH ends of every veth of the lab: the namespace's egress (its ``eth0``) and the host side's egress
(the bridge's way into the namespace), so each emulated node has an uplink and a downlink of the profile's rate, like
a port of a switch. ``netem`` is not available here, so no propagation delay is added: the profiles emulate bandwidth
only, and :mod:`cnnscale.lab.link` measures what the shaped link really delivers (its round trip included).

The bucket (``burst``) is sized from the rate: tbf refills it once per timer tick, so a bucket under rate/HZ bytes
throttles the link far below its rate. Measured here with :mod:`cnnscale.lab.link`: a 32 kbit bucket gave 0.81
Gbit/s at 1gbit and 1.14 Gbit/s at 5gbit; rate/100 gave 0.995 and 4.83. :func:`burst_bytes` takes rate/100 (HZ =
100, the smallest tick in use; a larger HZ only makes the bucket more than enough), and at least 128 KiB, so that a
64 KiB GSO packet of the veth always fits. The queue holds ``latency`` (25 ms) of traffic. What TCP then delivers
is ~97% of the rate (the headers of 1500-byte frames); the unshaped veth gives ~4.8 Gbit/s to one Python stream on
this 2-core machine, so profiles above a few gbit are not what limits a point here.
Pure stdlib; each shaping is 2N ``tc`` calls (a few ms each).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from cnnscale.errors import UserError

__all__ = ["Profile", "parse_profile", "PROFILE_FORMS", "UNSHAPED", "burst_bytes", "tbf_args", "shape_dev",
           "unshape_dev", "QDISC", "TICK_HZ"]

UNSHAPED = "unshaped"
QDISC = "tbf"
TICK_HZ = 100
"""Timer ticks per second assumed when sizing the bucket (the smallest HZ a kernel uses: a safe bucket)."""
LATENCY_MS = 25
MIN_BURST = 128 * 1024
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
    """The tbf bucket for ``rate_bps``: one timer tick of traffic (rate / HZ), at least :data:`MIN_BURST` bytes."""
    return max(int(rate_bps / 8 / TICK_HZ), MIN_BURST)


def tbf_args(profile: Profile) -> list[str]:
    """``tc qdisc replace dev X root`` + these: the tbf of a shaped profile (rate in bit/s, burst in bytes)."""
    if profile.rate_bps is None:
        raise ValueError("an unshaped profile has no tbf")
    return [QDISC, "rate", f"{int(profile.rate_bps)}bit", "burst", str(burst_bytes(profile.rate_bps)),
            "latency", f"{LATENCY_MS}ms"]


def _tc(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["tc", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode:
        raise UserError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")
    return res


def shape_dev(dev: str, profile: Profile, netns: str | None = None) -> None:
    """Put ``profile`` on the egress of ``dev`` (in ``netns``, or the host's): tbf for a shaped profile, the
    device's default qdisc for ``unshaped``. Raises UserError when tc refuses."""
    if profile.shaped:
        _tc(netns, "qdisc", "replace", "dev", dev, "root", *tbf_args(profile))
    else:
        unshape_dev(dev, netns)


def unshape_dev(dev: str, netns: str | None = None) -> None:
    """Remove any root qdisc of ``dev`` (none there is fine)."""
    _tc(netns, "qdisc", "del", "dev", dev, "root", check=False)
