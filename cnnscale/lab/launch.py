"""The command and environment of each rank of a lab launch: one process per namespace, one thread each.

Form: every rank is the target itself (``python -m cnnscale.train ...``), started inside its namespace with
``ip netns exec NS`` and the ``env://`` rendezvous of torch.distributed: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK=0``, ``LOCAL_WORLD_SIZE=1``, ``MASTER_ADDR`` = rank 0's namespace address and ``MASTER_PORT``.

Why not torchrun or accelerate launch: a launcher per namespace adds an agent process per node competing for the 2
cores, and torchrun's c10d rendezvous in namespaces needs ``--local-addr`` and ``is_host=1`` or it times out after
~110 s (STACK-FACTS.md); the trainer already makes its Accelerator from these variables (MULTI_CPU, gloo).

``GLOO_SOCKET_IFNAME`` pins gloo to the shaped interface (without it gloo advertises 127.0.0.1 and the other ranks
cannot connect), ``OMP_NUM_THREADS`` comes from the study's ``threads_per_process``, and ``CNNSCALE_NETWORK``
carries the network record that the trainer writes into env.json (:func:`cnnscale.records.env.collect_env`).
``ip netns exec`` execs the target, so each rank is one pid and ending its session ends it. The ranks keep the
host's name (env.json: one host; its ``network`` record counts the namespaces): they share one machine's cores, and
the CPU peak that MFU uses is cached per host name, so a name per namespace would re-measure it in every rank while
the others compete. Pure functions; nothing is started here.
"""

from __future__ import annotations

import json
from typing import Any

from cnnscale.lab.netns import Topology

__all__ = ["rank_commands", "rank_envs", "rendezvous_env", "NETWORK_ENV"]

NETWORK_ENV = "CNNSCALE_NETWORK"


def rank_commands(topo: Topology, n: int, argv: list[str]) -> list[list[str]]:
    """The argument list of each of ``n`` ranks (rank k in namespace k) running ``argv`` (interpreter first)."""
    if not 1 <= n <= len(topo.namespaces):
        raise ValueError(f"{n} ranks on a topology of {len(topo.namespaces)} namespaces")
    return [["ip", "netns", "exec", ns, *argv] for ns in topo.namespaces[:n]]


def rendezvous_env(rank: int, world_size: int, local_rank: int, local_world_size: int, node: int, addr: str,
                   port: int) -> dict[str, str]:
    """torch.distributed's ``env://`` variables of one rank (what torchrun would set): ``node`` is its GROUP_RANK."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world_size), "GROUP_RANK": str(node), "MASTER_ADDR": addr,
            "MASTER_PORT": str(port)}


def rank_envs(base: dict[str, str], topo: Topology, n: int, port: int,
              network: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """The environment of each of ``n`` ranks: ``base`` plus the env:// rendezvous, gloo's interface and the
    network record (JSON) when given."""
    envs = []
    for k in range(n):
        env = {**base, **rendezvous_env(k, n, 0, 1, k, topo.ips[0], port), "GLOO_SOCKET_IFNAME": topo.inner_if}
        if network is not None:
            env[NETWORK_ENV] = json.dumps(network, sort_keys=True)
        envs.append(env)
    return envs
