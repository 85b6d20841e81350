"""Helpers shared by the unit, functional and integration suites.

- `cli`: run the `votes` command line (tokens, admin tokens) from a test.
- `engine_process`: `votes serve` as a subprocess in its own process group.
- `vote_client`: sending votes and sorting the answers by what they tell about the count.
- `records`: WAL records and shard states built by hand, and a comparable state fingerprint.
- `http_client`: the one HTTP client of the suites; every response validated against
  engine/openapi.yaml.
- `waiting`: `wait_until`, a bounded wait for a condition (instead of a sleep).
"""
