"""One lab's lifetime: :class:`LabSession` makes the namespaces before a study's matrix, shapes them per profile,
measures each profile's link once, and removes everything after, on every way out.

``with LabSession(n) as lab:`` refuses with one line when the lab cannot run here (:func:`check_available`: root,
``ip``, ``tc``, namespaces), removes stale labs of dead owners, records this process as the owner, and
makes ``n`` namespaces; leaving the block (normally, on an exception, on Ctrl-C or SIGTERM raised through it)
removes the namespaces, veths, qdiscs and bridge, with SIGINT/SIGTERM/SIGHUP held back until that is done, so that a
second Ctrl-C cannot cut the teardown short. A SIGKILLed owner leaves its objects to the next lab (or
``python -m cnnscale.lab.netns clean``). Pure stdlib; the processes that run in the lab are started by the caller
(:mod:`cnnscale.study.launcher`) from :meth:`commands` and :meth:`envs`.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from cnnscale.errors import UserError
from cnnscale.lab import link, netns
from cnnscale.lab.launch import rank_commands, rank_envs
from cnnscale.lab.shape import QDISC, Profile, burst_bytes, gso_bytes, parse_profile, shape_dev

__all__ = ["LabSession", "check_available", "network_record"]

_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def check_available() -> None:
    """Raise a one-line UserError when a lab cannot run here (see :func:`cnnscale.lab.netns.unavailable_reason`)."""
    reason = netns.unavailable_reason()
    if reason:
        raise UserError(f"the network lab {reason}; run it as root on Linux with iproute2, or drop the study's "
                        "network/networks key")


def network_record(profile: Profile, n: int, measured: dict[str, Any] | None, interface: str) -> dict[str, Any]:
    """env.json's ``network``: the profile, its rate, the qdisc and bucket, what the link measured, and N."""
    return {"profile": profile.name, "rate_bps": profile.rate_bps, "interface": interface,
            "qdisc": QDISC if profile.shaped else None,
            "burst_bytes": burst_bytes(profile.rate_bps) if profile.rate_bps else None,
            "gso_max_bytes": gso_bytes(profile.rate_bps) if profile.rate_bps else None,
            "measured": measured, "namespaces": n}


class LabSession:
    """The namespaces of one study (see the module docstring); ``n``: the largest world size it runs."""

    def __init__(self, n: int, say: Callable[[str], None] = print) -> None:
        self.topo = netns.lab_topology(n, netns.new_lab_id())
        self.say = say
        self.current: str | None = None
        self.measured: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> LabSession:
        check_available()
        stale = netns.clean_stale()
        if stale:
            self.say(f"network lab: removed {len(stale)} stale objects of dead labs ({', '.join(stale[:4])} ...)")
        netns.claim(self.topo)
        try:
            netns.up(self.topo)
        except BaseException:
            self._teardown()
            raise
        self.say(f"network lab {self.topo.lab_id}: {len(self.topo.namespaces)} namespaces on {self.topo.bridge}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        held = sys.platform.startswith("linux")
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)  # a second Ctrl-C waits for the teardown
        try:
            netns.down(self.topo)
            netns.release(self.topo)
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)

    def shape(self, profile: Profile | str) -> Profile:
        """Put ``profile`` on both ends of every veth (a no-op when it is already on)."""
        prof = parse_profile(profile) if isinstance(profile, str) else profile
        if self.current != prof.name:
            for ns, host_if in zip(self.topo.namespaces, self.topo.host_ifs):
                shape_dev(self.topo.inner_if, prof, ns)
                shape_dev(host_if, prof)
            self.current = prof.name
        return prof

    def measure(self, profile: Profile | str) -> dict[str, Any]:
        """Shape ``profile`` and measure namespace 0 -> 1 (:func:`cnnscale.lab.link.measure`); kept per profile."""
        prof = self.shape(profile)
        if prof.name not in self.measured:
            if len(self.topo.namespaces) < 2:
                raise UserError("a link needs two namespaces")
            got = link.measure(self.topo.namespaces[0], self.topo.namespaces[1], self.topo.ips[1], prof.rate_Bps)
            self.measured[prof.name] = {k: got[k] for k in link.FIELDS}
        return self.measured[prof.name]

    def record(self, profile: Profile | str, n: int) -> dict[str, Any]:
        """The network record of a launch of ``n`` ranks under ``profile`` (its link measured if not yet)."""
        prof = parse_profile(profile) if isinstance(profile, str) else profile
        measured = self.measure(prof) if len(self.topo.namespaces) > 1 else None
        return network_record(prof, n, measured, self.topo.inner_if)

    def commands(self, argv: list[str], n: int) -> list[list[str]]:
        """Each rank's argument list (see :func:`cnnscale.lab.launch.rank_commands`)."""
        return rank_commands(self.topo, n, argv)

    def envs(self, base: dict[str, str], n: int, port: int, profile: Profile | str) -> list[dict[str, str]]:
        """Each rank's environment, the network record of ``profile`` included (the profile is shaped first)."""
        prof = self.shape(profile)
        return rank_envs(base, self.topo, n, port, self.record(prof, n))
