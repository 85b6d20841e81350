"""The engine's configuration: one typed, frozen object, loaded once and validated at start-up.

Sources, later wins: defaults < TOML file (`--config`) < environment (`VOTES_<FIELD>`) <
command-line flags. Every limit is explicit and named with its unit last. Worker processes
receive the parent's resolved config through `VOTES_CONFIG_JSON`, so all workers of one
server run with exactly the same settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from engine.errors import ConfigError

CONFIG_ENV = "VOTES_CONFIG_JSON"
GROUPS_AUTOMATIC_MAX = 4


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = ".data"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # Fixed per deployment, recorded in the data dir (and the WAL topic's partition count) on
    # first start: shard = voter_id mod shards (the unit of state); shard s is in fencing
    # group s mod groups (the unit of ownership, fencing and durable writes: one log append
    # per owned group per commit cycle). 32 shards in 4 groups: one worker runs 32 shards
    # as production runs ~24 per worker (1,024 shards), while a commit cycle makes 4 durable
    # writes, not 32; groups still spread over up to 4 workers (docs/design.md "Fencing
    # groups"). groups = 0: the largest divisor of shards up to GROUPS_AUTOMATIC_MAX (it
    # depends on shards alone, so the worker count never changes it).
    shards: int = 32
    groups: int = 0
    # Group commit: a commit cycle starts when votes wait, but at most every group_commit_ms
    # (sooner when batch_votes_max votes wait); the log's writer fsyncs what cycles queued.
    # 2 ms, not 1: at half the peak rate a worker spent 95-98 % of a core at 1 ms and 74-80 %
    # at 2 ms (per-cycle costs over twice the votes), for ~0.7 ms more median latency.
    group_commit_ms: float = 2.0
    # A commit cycle waits at most this long for its slowest shard before the next starts.
    group_commit_wait_ms: float = 100.0
    batch_votes_max: int = 4096
    # Votes waiting for one fencing group beyond this are shed with 503 `overloaded`.
    group_queue_votes_max: int = 65536
    append_timeout_s: float = 5.0
    # Requests one worker serves at once (Granian's backpressure; also the listen backlog).
    # A vote is held until its commit, so a worker carries rate x commit latency of them:
    # on the Kafka WAL (tens of ms a transaction) Granian's default of 1024 capped the rate.
    requests_in_flight_max: int = 4096
    # Slow and oversized request heads (Granian's HTTP/1 settings): a connection whose
    # request line and headers have not all arrived within header_read_timeout_ms is closed
    # (slowloris), and a head that does not fit request_head_bytes_max is refused, so idle
    # or hostile sockets cannot hold a worker's buffers (tests/functional/test_slow_clients.py).
    header_read_timeout_ms: int = 5000
    request_head_bytes_max: int = 128 * 1024
    vote_body_bytes_max: int = 4096
    poll_body_bytes_max: int = 65536
    segment_bytes_max: int = 64 * 1024 * 1024
    snapshot_interval_s: float = 60.0
    snapshot_votes_min: int = 100_000
    # A snapshot copies the whole shard on the event loop (~4 ms at 2M voters), so it also
    # waits for this share of the votes the last one held: its cost per vote stays flat as
    # the state grows, and recovery replays at most about this share from the log.
    snapshot_votes_share: float = 0.5
    snapshots_kept: int = 3
    # Receipt locator (shards/locator_runs.py): entries kept in RAM per poll and shard before
    # they are sorted into a run file, 12 bytes each (4096: ~1.6 MB for 32 shards).
    locator_run_entries: int = 4096
    # Forwarding between workers of one host over private unix sockets.
    forward_timeout_s: float = 5.0
    forward_connections_max: int = 64
    polls_max: int = 1024
    voter_token_ttl_s_default: int = 3600
    admin_token_ttl_s_default: int = 3600
    # A running worker looks at the token key files this often and reloads them when they
    # changed (`votes keys rotate|retire`): the bound on how long a rotation takes to apply.
    token_keys_check_s: float = 1.0
    # A running worker looks for a `votes snapshot now` request (engine/snapshot_requests.py)
    # this often: the bound on how long such a request waits before its snapshots start.
    snapshot_request_check_s: float = 1.0
    region: str = "local"
    # Home-region forwarding (engine/regions.py): "eu=http://10.0.1.5:8000,us=http://..." names
    # every region's vote endpoint. Empty: one region, and a token's region is not checked.
    # When set, a vote whose token names another region is sent there (one pooled client per
    # worker, at most region_forward_connections_max connections), waiting at most
    # region_forward_timeout_s; a token naming a region not listed here is refused (403).
    region_urls: str = ""
    region_forward_timeout_s: float = 2.0
    region_forward_connections_max: int = 64
    # Results (engine/results_publisher.py): each worker merges its tallies into Redis
    # (redis_url) this often; the results role streams what changed.
    results_publish_ms: float = 100.0
    # Server-Sent Events streams one `votes results` process holds at once (then 503).
    results_subscribers_max: int = 20_000
    # Receipt lookups on the results role (engine/results_receipts.py): the ingest role it
    # asks (an ingest node or the internal load balancer in front of them; empty: the role
    # answers receipts with 404 and a pointer to the ingest role), and the public receipt
    # keys it checks signatures with first (empty: <data_dir>/keys/receipt-public.json).
    results_ingest_url: str = ""
    receipt_public_keys_path: str = ""
    results_ingest_timeout_s: float = 2.0
    results_ingest_connections_max: int = 32
    # Traces (engine/tracing.py): off while trace_otlp_endpoint is empty; when on, this
    # share of requests is traced. 0.1 %: at the 250,000 votes/s peak that is still 250
    # traces a second (X-Ray bills per trace recorded: 1 % would be ten times the bill for
    # traces nobody reads), and a sampled vote's four spans cost about 200 us of CPU, so 1 %
    # would take over 3 % of a vote's CPU, 0.1 % under 0.5 % (perf/bench_tracing.py).
    trace_sample_ratio: float = 0.001
    trace_otlp_endpoint: str = ""
    # Kafka write-ahead log: used when bootstrap servers are given, else the embedded log.
    kafka_bootstrap_servers: str = ""
    wal_topic: str = "votes-wal"
    # An append sends whole record batches it built itself: lingering would only delay them.
    kafka_linger_ms: float = 0.0
    kafka_batch_bytes_max: int = 1024 * 1024
    kafka_transaction_timeout_s: float = 10.0
    kafka_request_timeout_s: float = 10.0
    # One append's send + commit must finish within this; then it is aborted (settled) or,
    # if its commit was already requested, decided by taking the fence again and reading the
    # partition. Keep kafka_append_timeout_s + kafka_abort_timeout_s below append_timeout_s.
    kafka_append_timeout_s: float = 3.0
    kafka_abort_timeout_s: float = 1.0
    # Replay and reads fail with wal-unavailable after this long without progress.
    kafka_read_stall_s: float = 30.0
    # Retries of the fence (start-up and after a lost producer) back off up to this.
    kafka_retry_backoff_s_max: float = 5.0
    # A shard's next transaction cannot add its partition until the coordinator has written
    # the last one's commit markers (~5 ms here); aiokafka retries every 20 ms meanwhile.
    # Retrying every 2 ms took one producer from 21 to 119 transactions/s (docs/performance.md).
    kafka_transaction_retry_ms: float = 2.0
    # S3 snapshots: used when an endpoint or bucket is given, else snapshots stay in data_dir.
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_prefix: str = "snapshots"
    # Shard ownership across hosts (engine/ownership.py), used when Kafka and Redis are both
    # configured. node_id defaults to "host:port", advertise_url to "http://host:port".
    # group_map ("node-a=0-3,node-b=4-7") names the fencing groups each node prefers; empty:
    # any node takes any free group. Leases say who should own a group; Kafka fences.
    node_id: str = ""
    advertise_url: str = ""
    redis_url: str = ""
    group_map: str = ""
    lease_ttl_s: float = 3.0
    lease_renew_s: float = 1.0
    # Rate limits of the vote path (engine/ratelimit.py, docs/security.md): GCRA per client
    # address, per /24 (IPv4) or /56 (IPv6) prefix, and per voter; `burst` requests at once,
    # then `per_s`. Addresses in ratelimit_exempt_networks skip the address and prefix
    # limits: loopback by default, so the perf harness and tests (one address, 127.0.0.1,
    # tens of thousands of votes/s) are not throttled; production serves no client there.
    # The voter limit applies to every voter: one voter votes once per poll, so its
    # defaults leave room for retries and concurrent duplicates.
    ratelimit_enabled: bool = True
    ratelimit_address_per_s: float = 50.0
    ratelimit_address_burst: int = 200
    ratelimit_prefix_per_s: float = 500.0
    ratelimit_prefix_burst: int = 2000
    ratelimit_voter_per_s: float = 10.0
    ratelimit_voter_burst: int = 100
    ratelimit_exempt_networks: str = "127.0.0.0/8,::1/128"
    # Peers whose X-Forwarded-For names the client (the edge), as a CIDR list; empty: none.
    trusted_proxies: str = ""
    # Keys each limiter of a worker remembers (least recently used evicted beyond).
    ratelimit_keys_max: int = 100_000
    # The global view: a Redis Cluster node (redis://host:port); empty: local limits only.
    # Each worker sends its counts every ratelimit_sync_ms, one Lua call per bucket (a hash
    # slot) with pending keys; a call waits at most ratelimit_store_timeout_ms. Buckets:
    # as many as the cluster has masters (their slots spread evenly over the slot space).
    ratelimit_redis_url: str = ""
    ratelimit_sync_ms: float = 200.0
    ratelimit_sync_buckets: int = 3
    ratelimit_store_timeout_ms: float = 250.0
    # Proof-of-work and velocity rules (engine/defences.py, engine/challenge.py,
    # docs/security.md): a vote's difficulty is the sum of the parts that apply, capped at
    # _max; with these defaults honest traffic solves nothing (min 0, load rule off) until
    # its address or prefix is rate limited or breaks a velocity rule (then suspicious for
    # suspicion_s). A challenge is valid for challenge_ttl_s, and a solution of one up to
    # challenge_grace_bits easier than asked for now is still taken (difficulty that rose
    # while the voter solved). The bits were chosen from perf/bench_challenge.py's figures.
    challenge_difficulty_bits_min: int = 0
    challenge_difficulty_bits_suspicious: int = 16
    challenge_difficulty_bits_load: int = 12
    challenge_difficulty_bits_max: int = 20
    challenge_load_votes_per_s: float = 0.0
    challenge_ttl_s: int = 120
    challenge_grace_bits: int = 2
    suspicion_s: float = 60.0
    suspicion_keys_max: int = 100_000
    velocity_window_s: float = 60.0
    velocity_prefix_votes_max: int = 3000
    velocity_prefix_voters_max: int = 300
    velocity_autoban_voters_max: int = 0
    velocity_autoban_ttl_s: int = 600
    # Ban lists (engine/bans.py): a Redis Cluster node holding them (empty: no store; the
    # velocity rules' auto-bans stay in the worker that made them). Each worker reloads its
    # copy every bans_refresh_ms (the bound on how stale it is), waiting at most
    # bans_store_timeout_ms, and loads at most bans_max entries per kind.
    bans_redis_url: str = ""
    bans_refresh_ms: float = 1000.0
    bans_store_timeout_ms: float = 500.0
    bans_max: int = 100_000
    # The issuer role (`votes issuer`, docs/tokens.md "Issuer role"): the OIDC provider whose
    # ID tokens it accepts (its issuer URL, discovery at <url>/.well-known/...), the audience
    # they must name (our client id there), the PostgreSQL holding voter_identities, and the
    # lifetime and country of the voter tokens it issues (region: `region` above).
    issuer_oidc_url: str = ""
    issuer_oidc_audience: str = ""
    issuer_database_url: str = ""
    issuer_token_ttl_s: int = 3600
    issuer_country: str = "ZZ"

    def resolved(self) -> "Config":
        """This config with `groups = 0` replaced by the number it stands for."""
        if self.groups != 0 or not 1 <= self.shards <= 4096:
            return self
        groups = max(divisor for divisor in range(1, GROUPS_AUTOMATIC_MAX + 1)
                     if self.shards % divisor == 0)
        return msgspec.structs.replace(self, groups=groups)

    def validate(self) -> "Config":
        """This config, `groups` resolved, or ConfigError naming the first broken rule."""
        if self.groups == 0:
            return self.resolved()._checked()
        return self._checked()

    def _checked(self) -> "Config":
        checks = [
            (1 <= self.shards <= 4096, "shards must be in 1..4096"),
            (1 <= self.groups <= self.shards and self.shards % self.groups == 0,
             "groups must divide shards (shard s is in group s mod groups)"),
            (1 <= self.workers <= self.groups,
             "workers must be in 1..groups (each worker owns whole fencing groups)"),
            (0 < self.port < 65536, "port must be in 1..65535"),
            (0 <= self.group_commit_ms <= 1000, "group_commit_ms must be in 0..1000"),
            (0 <= self.group_commit_wait_ms <= 60_000, "group_commit_wait_ms must be in 0..60000"),
            (1 <= self.batch_votes_max <= 65536, "batch_votes_max must be in 1..65536"),
            (self.group_queue_votes_max >= self.batch_votes_max,
             "group_queue_votes_max must be >= batch_votes_max"),
            (self.append_timeout_s > 0, "append_timeout_s must be positive"),
            (100 <= self.header_read_timeout_ms <= 60_000,
             "header_read_timeout_ms must be in 100..60000"),
            (8192 <= self.request_head_bytes_max <= 1 << 20,
             "request_head_bytes_max must be in 8KiB..1MiB"),
            (128 <= self.requests_in_flight_max <= 65536,
             "requests_in_flight_max must be in 128..65536"),
            (256 <= self.vote_body_bytes_max <= 1 << 20, "vote_body_bytes_max must be in 256..1MiB"),
            (1024 <= self.poll_body_bytes_max <= 1 << 24, "poll_body_bytes_max must be in 1KiB..16MiB"),
            (self.segment_bytes_max >= 1 << 16, "segment_bytes_max must be >= 64 KiB"),
            (self.snapshots_kept >= 1, "snapshots_kept must be >= 1"),
            (0.05 <= self.snapshot_request_check_s <= 60,
             "snapshot_request_check_s must be in 0.05..60"),
            (1024 <= self.locator_run_entries <= 1 << 20,
             "locator_run_entries must be in 1024..1048576"),
            (0 <= self.snapshot_votes_share <= 10, "snapshot_votes_share must be in 0..10"),
            (0 <= self.trace_sample_ratio <= 1, "trace_sample_ratio must be in 0..1"),
            (self.forward_timeout_s > 0, "forward_timeout_s must be positive"),
            (not self.uses_kafka
             or self.kafka_append_timeout_s + self.kafka_abort_timeout_s < self.append_timeout_s,
             "kafka_append_timeout_s + kafka_abort_timeout_s must stay below append_timeout_s"),
            (0.5 <= self.kafka_transaction_retry_ms <= 100,
             "kafka_transaction_retry_ms must be in 0.5..100"),
            (self.lease_renew_s > 0, "lease_renew_s must be positive"),
            (self.lease_ttl_s >= 2 * self.lease_renew_s,
             "lease_ttl_s must be at least twice lease_renew_s (one missed renewal is tolerated)"),
            (" " not in self.node_name and self.node_name, "node_id must be non-empty without spaces"),
            (10 <= self.results_publish_ms <= 60_000, "results_publish_ms must be in 10..60000"),
            (re.match(r"(https?://.|$)", self.results_ingest_url), "results_ingest_url: http(s)"),
            (0 < self.results_ingest_timeout_s <= 30, "results_ingest_timeout_s must be in 0..30"),
            (1 <= self.results_ingest_connections_max <= 1024,
             "results_ingest_connections_max must be in 1..1024"),
            (1 <= self.results_subscribers_max <= 1_000_000,
             "results_subscribers_max must be in 1..1000000"),
            (0 < self.region_forward_timeout_s <= 60, "region_forward_timeout_s must be in (0, 60]"),
            (1 <= self.region_forward_connections_max <= 4096,
             "region_forward_connections_max must be in 1..4096"),
            *self._ratelimit_checks(),
            *self._defence_checks(),
            (60 <= self.issuer_token_ttl_s <= 7 * 86400,
             "issuer_token_ttl_s must be in 60..604800"),
            (not self.issuer_oidc_url or _secure_or_local_url(self.issuer_oidc_url),
             "issuer_oidc_url must be https:// (plain http only on 127.0.0.1/localhost)"),
            (not self.issuer_database_url
             or self.issuer_database_url.startswith(("postgresql://", "postgres://")),
             "issuer_database_url must be a postgresql:// URL"),
            (re.fullmatch(r"[A-Za-z0-9_-]{1,8}", self.issuer_country) is not None,
             "issuer_country must be 1..8 characters of A-Z a-z 0-9 _ -"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        parse_group_map(self.group_map, self.groups)
        urls = parse_region_urls(self.region_urls)
        if urls and self.region not in urls:
            raise ConfigError(f"region_urls must name this region {self.region!r} too")
        return self

    def _ratelimit_checks(self) -> list[tuple[bool, str]]:
        return [
            *[(0 < rate <= 1_000_000, f"ratelimit_{kind}_per_s must be in (0, 1000000]")
              for kind, rate in (("address", self.ratelimit_address_per_s),
                                 ("prefix", self.ratelimit_prefix_per_s),
                                 ("voter", self.ratelimit_voter_per_s))],
            *[(1 <= burst <= 1_000_000, f"ratelimit_{kind}_burst must be in 1..1000000")
              for kind, burst in (("address", self.ratelimit_address_burst),
                                  ("prefix", self.ratelimit_prefix_burst),
                                  ("voter", self.ratelimit_voter_burst))],
            (1000 <= self.ratelimit_keys_max <= 10_000_000,
             "ratelimit_keys_max must be in 1000..10000000"),
            (10 <= self.ratelimit_sync_ms <= 60_000, "ratelimit_sync_ms must be in 10..60000"),
            (1 <= self.ratelimit_sync_buckets <= 256, "ratelimit_sync_buckets must be in 1..256"),
            (1 <= self.ratelimit_store_timeout_ms <= 10_000,
             "ratelimit_store_timeout_ms must be in 1..10000"),
            (_networks_valid(self.ratelimit_exempt_networks),
             "ratelimit_exempt_networks must be a comma-separated CIDR list"),
            (_networks_valid(self.trusted_proxies),
             "trusted_proxies must be a comma-separated CIDR list"),
        ]

    def _defence_checks(self) -> list[tuple[bool, str]]:
        bits = (("min", self.challenge_difficulty_bits_min),
                ("suspicious", self.challenge_difficulty_bits_suspicious),
                ("load", self.challenge_difficulty_bits_load),
                ("max", self.challenge_difficulty_bits_max))
        return [
            *[(0 <= value <= 32, f"challenge_difficulty_bits_{name} must be in 0..32")
              for name, value in bits],
            (0 <= self.challenge_load_votes_per_s <= 10_000_000,
             "challenge_load_votes_per_s must be in 0..10000000 (0: off)"),
            (10 <= self.challenge_ttl_s <= 3600, "challenge_ttl_s must be in 10..3600"),
            (0 <= self.challenge_grace_bits <= 8, "challenge_grace_bits must be in 0..8"),
            (1 <= self.suspicion_s <= 86400, "suspicion_s must be in 1..86400"),
            (1000 <= self.suspicion_keys_max <= 10_000_000,
             "suspicion_keys_max must be in 1000..10000000"),
            (1 <= self.velocity_window_s <= 3600, "velocity_window_s must be in 1..3600"),
            (1 <= self.velocity_prefix_votes_max <= 10_000_000,
             "velocity_prefix_votes_max must be in 1..10000000"),
            (1 <= self.velocity_prefix_voters_max <= 100_000,
             "velocity_prefix_voters_max must be in 1..100000"),
            (0 <= self.velocity_autoban_voters_max <= 100_000,
             "velocity_autoban_voters_max must be in 0..100000 (0: off)"),
            # A prefix is suspected (asked for proof-of-work) before it is banned.
            (self.velocity_autoban_voters_max == 0
             or self.velocity_autoban_voters_max >= self.velocity_prefix_voters_max,
             "velocity_autoban_voters_max must be 0 or at least velocity_prefix_voters_max"),
            (60 <= self.velocity_autoban_ttl_s <= 30 * 86400,
             "velocity_autoban_ttl_s must be in 60..2592000"),
            (50 <= self.bans_refresh_ms <= 60_000, "bans_refresh_ms must be in 50..60000"),
            (1 <= self.bans_store_timeout_ms <= 10_000,
             "bans_store_timeout_ms must be in 1..10000"),
            (1 <= self.bans_max <= 10_000_000, "bans_max must be in 1..10000000"),
        ]

    def group_of(self, shard: int) -> int:
        return shard % self.groups

    def shards_of_group(self, group: int) -> range:
        return range(group, self.shards, self.groups)

    @property
    def uses_cluster(self) -> bool:
        """Shard ownership by Redis leases across hosts (else: slots within one host)."""
        return self.uses_kafka and bool(self.redis_url)

    @property
    def node_name(self) -> str:
        return self.node_id or f"{self.host}:{self.port}"

    @property
    def advertised_url(self) -> str:
        return (self.advertise_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def uses_kafka(self) -> bool:
        return bool(self.kafka_bootstrap_servers)

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_bucket)


def _networks_valid(text: str) -> bool:
    try:
        for part in text.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)
    except ValueError:
        return False
    return True


def _secure_or_local_url(url: str) -> bool:
    """https, or http to this host only: an ID token's keys must not travel in the clear."""
    parts = urlsplit(url)
    return bool(parts.hostname) and (parts.scheme == "https" or (
        parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")))


def parse_group_map(text: str, groups: int) -> dict[int, str]:
    """`"node-a=0-3,node-b=4-7"` -> {group: node id}; one range (N or N-M) per entry, and a
    node may have several entries. Empty text -> {} (no preferences). A non-empty map must
    name every group 0..groups-1 exactly once."""
    if not text.strip():
        return {}
    preferred: dict[int, str] = {}
    for entry in text.split(","):
        node, _, group_range = entry.strip().partition("=")
        node, group_range = node.strip(), group_range.strip()
        first, _, last = group_range.partition("-")
        if not node or " " in node or not first.isdigit() or (last and not last.isdigit()):
            raise ConfigError(f"group_map entry {entry.strip()!r} is not NODE=N or NODE=N-M")
        low, high = int(first), int(last or first)
        if low > high or high >= groups:
            raise ConfigError(f"group_map range {group_range!r} is not inside 0..{groups - 1}")
        for group in range(low, high + 1):
            if group in preferred:
                raise ConfigError(f"group_map names group {group} twice "
                                  f"({preferred[group]!r} and {node!r})")
            preferred[group] = node
    missing = [group for group in range(groups) if group not in preferred]
    if missing:
        raise ConfigError(f"group_map does not name groups {missing}: every group needs one node")
    return preferred


REGION_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # no "|": it separates CRDT fields


def parse_region_urls(text: str) -> dict[str, str]:
    """`"eu=http://127.0.0.1:8001,us=http://127.0.0.1:8002"` -> {region: base URL without a
    trailing slash}. Empty text -> {} (a single region). Each region once, URLs http(s)."""
    if not text.strip():
        return {}
    urls: dict[str, str] = {}
    for entry in text.split(","):
        region, _, url = (part.strip() for part in entry.partition("="))
        if not REGION_PATTERN.match(region) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"region_urls entry {entry.strip()!r} is not REGION=http(s)://HOST:PORT")
        if region in urls:
            raise ConfigError(f"region_urls names region {region!r} twice")
        urls[region] = url.rstrip("/")
    return urls


_FIELD_TYPES = {name: type(getattr(Config(), name)) for name in Config.__struct_fields__}


def _from_environment() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in _FIELD_TYPES.items():
        raw = os.environ.get("VOTES_" + name.upper())
        if raw is None:
            continue
        try:
            values[name] = _parse_bool(raw) if kind is bool else kind(raw)
        except ValueError as exc:
            raise ConfigError(f"VOTES_{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
    return values


def _parse_bool(raw: str) -> bool:
    """bool("false") is True, so booleans from the environment are spelled out."""
    spelled = raw.strip().lower()
    if spelled not in ("true", "false", "1", "0"):
        raise ValueError(raw)
    return spelled in ("true", "1")


def load_config(config_file: str | None = None, **overrides: Any) -> Config:
    """Resolve defaults, file, environment and flags (flags given as non-None overrides)."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as handle:
                values.update(tomllib.load(handle))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    values.update(_from_environment())
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        config = msgspec.convert(values, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    return config.validate()


def config_for_workers(config: Config) -> str:
    return msgspec.json.encode(config).decode()


def config_from_parent() -> Config:
    raw = os.environ.get(CONFIG_ENV)
    if raw is None:
        raise ConfigError(f"{CONFIG_ENV} is not set: start workers through `votes serve`")
    return msgspec.json.decode(raw, type=Config).validate()
