"""Real Redis topologies for the tests: a three-master cluster, and a Sentinel-managed primary.

Every process is a real `redis-server` on a free loopback port (see `RedisServer`);
the cluster is formed with `redis-cli --cluster create`, the sentinels run as
`redis-server sentinel.conf --sentinel`. Failure detection is tuned down to about
a second, so a failover completes within a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
from redis.crc import key_slot

from tests.support.procs import RedisServer, free_port, redis_server_binary

T = TypeVar("T")

#: A replica's first sync starts at once, instead of after the default 5 s wait for others.
FAST_SYNC = ("--repl-diskless-sync-delay", "0")


def wait_until(
    check: Callable[[], T | None], timeout: float, message: str, interval: float = 0.02
) -> T:
    """Poll `check` until it returns something truthy (and return it); errors count as no."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} did not happen within {timeout}s")
        time.sleep(interval)


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
    return path


# -- Redis Cluster ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of CLUSTER NODES, as seen by a live node."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags


def cluster_nodes(client: redis.Redis) -> list[ClusterNodeInfo]:
    """CLUSTER NODES as `client`'s node sees it."""
    parsed = client.execute_command("CLUSTER NODES")
    return [
        ClusterNodeInfo(
            node_id=node["node_id"],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(node["flags"].split(",")),
            master_id=None if node["master_id"] == "-" else node["master_id"],
            slots=tuple((int(r[0]), int(r[-1])) for r in node["slots"]),
        )
        for address, node in parsed.items()
    ]


class RedisClusterFixture:
    """`masters` masters with `replicas` replicas each, formed by `redis-cli --cluster create`.

    `require_full_coverage=False` (`cluster-require-full-coverage no`, what a cache
    runs with) keeps the healthy masters serving their slots while one is down;
    with True, the whole cluster answers CLUSTERDOWN until a replica takes over.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        require_full_coverage: bool = False,
    ) -> None:
        self.masters_count = masters
        self.replicas_count = replicas
        self.node_timeout_ms = node_timeout_ms
        self.require_full_coverage = require_full_coverage
        self.servers: dict[int, RedisServer] = {}
        self.down: set[int] = set()  # killed or paused

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> RedisClusterFixture:
        try:
            for _ in range(self.masters_count * (1 + self.replicas_count)):
                server = RedisServer(
                    None,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    # the bus port, given: the default (port + 10000) may be taken or > 65535
                    "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-require-full-coverage",
                    "yes" if self.require_full_coverage else "no",
                    *FAST_SYNC,
                )  # fmt: skip
                self.servers[server.port] = server.start()
            create = [
                redis_cli_binary(),
                "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.servers),
                "--cluster-replicas", str(self.replicas_count),
                "--cluster-yes",
            ]  # fmt: skip
            subprocess.run(
                create,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
            )
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says `cluster_state:ok`, agrees on who serves every slot, and
        every replica is in sync with its master."""

        def healthy() -> bool:
            views = []
            for port in self.live_ports():
                client = self.servers[port].admin
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
                views.append(self._slot_owners(port))
                if client.info("replication")["role"] == "slave" and (
                    client.info("replication").get("master_link_status") != "up"
                ):
                    return False
            return all(view == views[0] for view in views) and len(views[0]) == (self.masters_count)

        wait_until(healthy, timeout, "cluster healthy")

    # -- topology ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL the service is given: one master; the client discovers the rest."""
        return self.servers[self.master_ports()[0]].url

    def live_ports(self) -> list[int]:
        return [port for port in self.servers if port not in self.down]

    def nodes(self) -> list[ClusterNodeInfo]:
        """CLUSTER NODES as the first live node sees it."""
        port = self.live_ports()[0]
        return cluster_nodes(self.servers[port].admin)

    def _slot_owners(self, port: int) -> dict[tuple[int, int], int]:
        nodes = cluster_nodes(self.servers[port].admin)
        return {r: n.port for n in nodes if n.is_master and not n.failed for r in n.slots}

    def master_ports(self) -> list[int]:
        """The live masters that serve slots, in slot order."""
        owners = self._slot_owners(self.live_ports()[0])
        ports = [owners[r] for r in sorted(owners)]
        return [p for p in dict.fromkeys(ports) if p not in self.down]

    def masters(self) -> list[RedisServer]:
        return [self.servers[port] for port in self.master_ports()]

    def slot_map(self) -> SlotMap:
        """Who serves which slot now, as the first live node sees it."""
        return SlotMap(self._slot_owners(self.live_ports()[0]))

    def master_for_key(self, key: str | bytes) -> RedisServer:
        return self.servers[self.slot_map().port_for_key(key)]

    def replica_ports_of(self, master_port: int) -> list[int]:
        nodes = self.nodes()
        master_id = next(n.node_id for n in nodes if n.port == master_port)
        return [n.port for n in nodes if n.master_id == master_id and not n.failed]

    def client(self) -> redis.RedisCluster:
        """A synchronous cluster client for the test's own look-ups."""
        port = self.master_ports()[0]
        return redis.RedisCluster(host="127.0.0.1", port=port, socket_timeout=2)

    # -- failures ---------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        self.down.add(port)
        self.servers[port].kill()

    def pause(self, port: int) -> None:
        """SIGSTOP: connections are accepted and never answered, as with a hung host."""
        self.down.add(port)
        self.servers[port].pause()

    def wait_for_promotion(
        self, failed_port: int, replica_port: int, timeout: float = 20.0
    ) -> None:
        """The replica serves the failed master's slots, in the view of every live node."""

        def promoted() -> bool:
            for port in self.live_ports():
                nodes = cluster_nodes(self.servers[port].admin)
                by_port = {n.port: n for n in nodes}
                if not (by_port[replica_port].is_master and by_port[replica_port].slots):
                    return False
                if by_port[failed_port].slots:
                    return False
                if self.servers[port].admin.cluster("info")["cluster_state"] != "ok":
                    return False
            return True

        wait_until(promoted, timeout, f"promotion of {replica_port}", interval=0.05)

    def dbsize_by_port(self) -> dict[int, int]:
        return {port: int(self.servers[port].admin.dbsize()) for port in self.master_ports()}


@dataclass(frozen=True)
class SlotMap:
    """Slot ranges and the port of the master serving each."""

    owners: dict[tuple[int, int], int]

    def port_for_slot(self, slot: int) -> int:
        for (first, last), port in self.owners.items():
            if first <= slot <= last:
                return port
        raise LookupError(f"no master serves slot {slot}")

    def port_for_key(self, key: str | bytes) -> int:
        return self.port_for_slot(key_slot(_bytes(key)))


# -- Sentinel -----------------------------------------------------------------------------


class SentinelProcess:
    """One `redis-server sentinel.conf --sentinel` on a free loopback port."""

    def __init__(self, master_name: str, master_port: int, quorum: int, timing: tuple[int, int]):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.config = self.dir / "sentinel.conf"
        down_after, failover_timeout = timing
        self.config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode no",
                    f"dir {self.dir}",
                    f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
                    f"sentinel down-after-milliseconds {master_name} {down_after}",
                    f"sentinel failover-timeout {master_name} {failover_timeout}",
                    f"sentinel parallel-syncs {master_name} 1",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> SentinelProcess:
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.admin.ping, 10, f"sentinel on {self.port} up")
        # INFO every 10 s, and an old primary demoted only 4 hello periods (8 s) after it is
        # seen again: a switched-over primary would go on taking writes that long
        self.admin.execute_command("SENTINEL DEBUG", "info-period", "200", "publish-period", "200")
        return self

    def stop(self) -> None:
        self.admin.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelFixture:
    """A primary, a replica (`--replicaof`) and `sentinels` sentinels watching `master_name`."""

    def __init__(
        self,
        sentinels: int = 1,
        master_name: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.master_name = master_name
        self.sentinel_count = sentinels
        self.timing = (down_after_ms, failover_timeout_ms)
        self.primary = RedisServer(None, *FAST_SYNC)
        self.replica = RedisServer(None, *FAST_SYNC)
        self.sentinels: list[SentinelProcess] = []

    def start(self, timeout: float = 20.0) -> SentinelFixture:
        try:
            self.primary.start()
            self.replica.extra += ["--replicaof", "127.0.0.1", str(self.primary.port)]
            self.replica.start()
            wait_until(self._replica_in_sync, timeout, "replica in sync")
            quorum = self.sentinel_count // 2 + 1
            for _ in range(self.sentinel_count):
                sentinel = SentinelProcess(self.master_name, self.primary.port, quorum, self.timing)
                self.sentinels.append(sentinel.start())
            wait_until(self._sentinels_ready, timeout, "sentinels see the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.primary.stop()
        self.replica.stop()

    @property
    def sentinel_addresses(self) -> str:
        """`REDIS_SENTINELS` for the service."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        """The primary's port as the first sentinel reports it."""
        _, port = self.sentinels[0].admin.sentinel_get_master_addr_by_name(self.master_name)
        return int(port)

    def _replica_in_sync(self) -> bool:
        info = self.replica.admin.info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            replicas = sentinel.admin.sentinel_slaves(self.master_name)
            if not any(int(r["port"]) == self.replica.port and not r["is_sdown"] for r in replicas):
                return False
            known = sentinel.admin.sentinel_master(self.master_name)["num-other-sentinels"]
            if int(known) < self.sentinel_count - 1:
                return False
        return True

    def kill_primary(self) -> None:
        self.primary.kill()

    def switchover(self, timeout: float = 10.0) -> None:
        """SENTINEL FAILOVER: the replica is promoted, the primary stays up and is demoted.

        Sentinel answers NOGOODSLAVE until it has fresh INFO from the replica; ask again.
        """

        def accepted() -> bool:
            try:
                return bool(self.sentinels[0].admin.sentinel_failover(self.master_name))
            except redis.ResponseError as exc:
                if "NOGOODSLAVE" in str(exc):
                    return False
                raise

        wait_until(accepted, timeout, "SENTINEL FAILOVER accepted", interval=0.1)

    def wait_for_demotion(self, timeout: float = 20.0) -> None:
        """The old primary (alive after a switchover) has become a replica of the new one."""

        def demoted() -> bool:
            info = self.primary.admin.info("replication")
            return info["role"] == "slave" and int(info["master_port"]) == self.replica.port

        wait_until(demoted, timeout, "demotion of the old primary")

    def wait_for_promotion(self, timeout: float = 20.0) -> None:
        """Every sentinel names the replica as the master, and the replica says it is one."""

        def promoted() -> bool:
            if any(
                int(s.admin.sentinel_get_master_addr_by_name(self.master_name)[1])
                != self.replica.port
                for s in self.sentinels
            ):
                return False
            return bool(self.replica.admin.info("replication")["role"] == "master")

        wait_until(promoted, timeout, "sentinel promotion of the replica", interval=0.05)


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key
