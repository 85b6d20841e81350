"""The port layout of one local stack: every port is its base port plus a fixed offset.

Invariant: a stack uses only ports within [base, base + STACK_PORT_SPAN) plus the SeaweedFS
admin gRPC port (admin port + 10000, see `weed_admin_grpc`), so two stacks whose base
ports are at least STACK_PORT_SPAN apart never share a port. The base port is bounded so
that all of them stay below Linux's ephemeral range (32768+), where a client's outgoing
connection could take a port before the service binds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from deploy.local.processes import StackError

DEFAULT_BASE_PORT = 19000
BASE_PORT_MIN = 1024  # below this only root may bind
BASE_PORT_MAX = 22000  # base + 10037 stays below the ephemeral range
STACK_PORT_SPAN = 100  # offsets 0..99: two stacks need base ports this far apart
BROKER_COUNT = 3  # Kafka nodes 1..3, each a broker and a controller

# Offsets from the base port.
KAFKA_BROKER_OFFSET = 91  # + node number 1..3
KAFKA_CONTROLLER_OFFSET = 94  # + node number 1..3
S3_OFFSET = 33
WEED_MASTER_OFFSET = 34
WEED_VOLUME_OFFSET = 35
WEED_FILER_OFFSET = 36
WEED_ADMIN_OFFSET = 37
S3_GRPC_OFFSET = 43
WEED_MASTER_GRPC_OFFSET = 44
WEED_VOLUME_GRPC_OFFSET = 45
WEED_FILER_GRPC_OFFSET = 46
# weed mini's maintenance worker dials the admin HTTP port + 10000 whatever
# -admin.port.grpc says, so the stack uses exactly that port.
WEED_ADMIN_GRPC_DISTANCE = 10000
REDIS_OFFSET = 79
# Redis Cluster (deploy/local/redis_cluster.py): masters at + 50..52, cluster bus at + 53..55.
REDIS_CLUSTER_OFFSET = 50
REDIS_CLUSTER_MASTERS = 3
# The issuer role's test services (tests/integration/conftest.py): the OIDC provider
# (deploy/local/oidc_provider.py) and its PostgreSQL. Every offset here is distinct
# (tests/unit/test_local_stack.py checks it): the issuer's once shared + 50 with the
# Redis Cluster, and whichever started second could not bind.
OIDC_PROVIDER_OFFSET = 60
ISSUER_POSTGRES_OFFSET = 61


def default_base_port() -> int:
    return int(os.environ.get("VOTES_STACK_BASE_PORT", str(DEFAULT_BASE_PORT)))


def check_base_port(base_port: int) -> int:
    if not BASE_PORT_MIN <= base_port <= BASE_PORT_MAX:
        raise StackError(f"base port must be within {BASE_PORT_MIN}..{BASE_PORT_MAX}, "
                         f"got {base_port}")
    return base_port


@dataclass(frozen=True)
class Ports:
    base: int

    def kafka(self, node: int) -> int:
        return self.base + KAFKA_BROKER_OFFSET + node

    def controller(self, node: int) -> int:
        return self.base + KAFKA_CONTROLLER_OFFSET + node

    @property
    def s3(self) -> int:
        return self.base + S3_OFFSET

    @property
    def weed_master(self) -> int:
        return self.base + WEED_MASTER_OFFSET

    @property
    def weed_volume(self) -> int:
        return self.base + WEED_VOLUME_OFFSET

    @property
    def weed_filer(self) -> int:
        return self.base + WEED_FILER_OFFSET

    @property
    def weed_admin(self) -> int:
        return self.base + WEED_ADMIN_OFFSET

    @property
    def weed_admin_grpc(self) -> int:
        return self.weed_admin + WEED_ADMIN_GRPC_DISTANCE

    @property
    def s3_grpc(self) -> int:
        return self.base + S3_GRPC_OFFSET

    @property
    def weed_master_grpc(self) -> int:
        return self.base + WEED_MASTER_GRPC_OFFSET

    @property
    def weed_volume_grpc(self) -> int:
        return self.base + WEED_VOLUME_GRPC_OFFSET

    @property
    def weed_filer_grpc(self) -> int:
        return self.base + WEED_FILER_GRPC_OFFSET

    @property
    def redis(self) -> int:
        return self.base + REDIS_OFFSET

    def redis_cluster(self, index: int) -> int:
        return self.base + REDIS_CLUSTER_OFFSET + index

    def redis_cluster_bus(self, index: int) -> int:
        return self.base + REDIS_CLUSTER_OFFSET + REDIS_CLUSTER_MASTERS + index

    def redis_cluster_all(self) -> list[int]:
        """Every port the Redis Cluster binds (started on its own, not by `stack up`)."""
        return [port for index in range(REDIS_CLUSTER_MASTERS)
                for port in (self.redis_cluster(index), self.redis_cluster_bus(index))]

    def weed_all(self) -> list[int]:
        """Every port SeaweedFS's `weed mini` binds."""
        return [
            self.s3, self.weed_master, self.weed_volume, self.weed_filer, self.weed_admin,
            self.s3_grpc, self.weed_master_grpc, self.weed_volume_grpc, self.weed_filer_grpc,
            self.weed_admin_grpc,
        ]

    def kafka_all(self) -> list[int]:
        """Every broker and controller port."""
        nodes = range(1, BROKER_COUNT + 1)
        return [self.kafka(node) for node in nodes] + [self.controller(node) for node in nodes]

    def all_ports(self) -> list[int]:
        """Every port the stack binds."""
        return [*self.kafka_all(), *self.weed_all(), self.redis]
