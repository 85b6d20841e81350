"""The attack simulation's pure parts (perf/attack_bots.py, perf/attack_targets.py).

Proves: every forgery the bots send is a token the engine's own verifier refuses (and the
token it was made from verifies), so a 401 in the bench is the defence working and not a
malformed request; the Ledger reports each integrity failure the bench exits 1 on (an
invalid token's vote accepted, a token counted twice, a total that does not match the
201s) and none on a clean run; the proof-of-work solver meets the difficulty or gives up
within its budget; honest addresses stay below the prefix limit; the targets judge the
CPU ratios and the flood bound as documented.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from engine.keys import ensure_keys, load_keys
from engine.tokens import TokenExpired, TokenInvalid, issue_voter_token, verify_voter_token
from perf.attack_bots import (FORGERY_KINDS, Ledger, PowBot, forge, honest_address,
                              leading_zero_bits, solve_sha256)
from perf.attack_http import TRANSPORT_ERROR
from perf.attack_targets import attack_targets, cpu_ratios
from perf.attack_run import forged_tokens


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory):
    data_dir: Path = tmp_path_factory.mktemp("attack-keys")
    ensure_keys(data_dir)
    return load_keys(data_dir)


@pytest.mark.parametrize("kind", [kind for kind in FORGERY_KINDS if kind != "expired"])
def test_every_forgery_is_refused_and_its_original_is_not(keyring, kind: str) -> None:
    now_s = int(time.time())
    for voter in range(50):  # several tokens: the flipped character differs between them
        token = issue_voter_token(keyring, voter, ttl_s=600)
        assert verify_voter_token(keyring, f"Bearer {token}", now_s, "p").voter == voter
        forged = forge(token, kind)
        assert forged != token
        with pytest.raises(TokenInvalid):
            verify_voter_token(keyring, f"Bearer {forged}", now_s, "p")


def test_expired_tokens_are_refused_as_expired(keyring) -> None:
    past_s = int(time.time()) - 7200
    token = issue_voter_token(keyring, 7, ttl_s=600, now_s=past_s)
    assert verify_voter_token(keyring, f"Bearer {token}", past_s + 1, "p").voter == 7
    with pytest.raises(TokenExpired):
        verify_voter_token(keyring, f"Bearer {token}", int(time.time()), "p")
    kinds = {kind for kind, _ in forged_tokens([issue_voter_token(keyring, 1, ttl_s=60)] * 6,
                                               [token])}
    assert kinds == set(FORGERY_KINDS)


def clean_ledger() -> Ledger:
    ledger = Ledger()
    for voter in range(10):
        ledger.record("honest", str(voter), True, 201)
    ledger.record("replay-stolen", "100", True, 201)
    ledger.record("replay-stolen", "100", True, 409)
    ledger.record("forged-bad-mac", "f1", False, 401)
    return ledger


def test_a_clean_run_has_no_integrity_failure() -> None:
    assert clean_ledger().integrity_failures(results_total=11) == []


def test_an_invalid_tokens_vote_accepted_is_an_integrity_failure() -> None:
    ledger = clean_ledger()
    ledger.record("forged-expired", "f2", False, 201)
    failures = ledger.integrity_failures(results_total=12)
    assert failures == ["1 votes accepted for invalid tokens from bot forged-expired"]


def test_one_token_accepted_twice_is_an_integrity_failure() -> None:
    ledger = clean_ledger()
    ledger.record("reuse-one-token", "100", True, 201)  # the stolen token's second 201
    failures = ledger.integrity_failures(results_total=12)
    assert len(failures) == 1 and "1 tokens accepted more than once (100 x2)" in failures[0]


def test_a_total_that_does_not_match_the_201s_is_an_integrity_failure() -> None:
    ledger = clean_ledger()
    assert ledger.integrity_failures(results_total=12)  # a vote counted without its 201
    assert ledger.integrity_failures(results_total=10)  # a 201 not counted
    ledger.record("flood-prefix", "300", True, TRANSPORT_ERROR)  # no answer: may be counted
    assert ledger.integrity_failures(results_total=12) == []
    assert ledger.integrity_failures(results_total=11) == []
    assert ledger.integrity_failures(results_total=13)


def test_the_solver_meets_the_difficulty_or_gives_up_within_its_budget() -> None:
    solution = solve_sha256("challenge-1", 12, budget_s=5.0)
    assert solution.nonce is not None
    digest = hashlib.sha256(f"challenge-1.{solution.nonce}".encode()).digest()
    assert leading_zero_bits(digest) >= 12
    started = time.perf_counter()
    hopeless = solve_sha256("challenge-2", 64, budget_s=0.05)
    assert hopeless.nonce is None and time.perf_counter() - started < 1.0
    bot = PowBot(budget_s=0.05)
    assert bot.solve({"challenge": "c", "difficulty_bits": 64}) is None
    headers = bot.solve({"challenge": "c", "difficulty_bits": 4})
    assert headers is not None and headers["X-Vote-Challenge"] == "c"
    assert (bot.challenges, bot.solved, bot.unsolved) == (2, 1, 1)


def test_honest_addresses_are_distinct_and_200_per_prefix() -> None:
    addresses = [honest_address(index) for index in range(5000)]
    assert len(set(addresses)) == 5000
    prefixes: dict[str, int] = {}
    for address in addresses:
        prefix = address.rpartition(".")[0]
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    assert max(prefixes.values()) == 200


def document(cpu_us: dict[str, float], flood_accepted: int) -> dict:
    return {
        "mixed": {"bots": {"honest": {"sent": 1000, "accepted": 1000, "statuses": {}},
                           "flood-prefix": {"sent": 9000, "accepted": flood_accepted,
                                            "statuses": {}}},
                  "elapsed_s": {"flood-prefix": 4.0}, "tokens_accepted_max": 1},
        "limits": {"prefix_burst": 2000, "prefix_per_s": 500.0, "workers": 1},
        "cpu_ratios": cpu_ratios({name: {"server_cpu_us_per_answer": us}
                                  for name, us in cpu_us.items()}),
        "pow": {"built": False, "challenge_endpoint_status": 404, "budget_s": 0.05},
    }


def test_targets_judge_the_cpu_ratios_and_the_flood_bound() -> None:
    rows = {row["target"]: row for row in attack_targets(document(
        {"accepted": 200.0, "forged": 40.0, "rate-limited": 60.0, "duplicate": 300.0}, 4000))}
    assert rows["attack cpu forged / accepted"]["verdict"] == "PASS"  # 0.2
    assert rows["attack cpu rate-limited / accepted"]["verdict"] == "FAIL"  # 0.3
    assert rows["attack cpu duplicate / accepted"]["verdict"] == "FAIL"  # 1.5
    assert rows["attack flood accepted / prefix limit"]["verdict"] == "PASS"  # 4000 / 4000
    assert rows["attack honest accepted %"]["verdict"] == "PASS"
    assert rows["attack pow bots"]["verdict"] == "not measured"
    over = {row["target"]: row for row in attack_targets(document({"accepted": 200.0}, 4001))}
    assert over["attack flood accepted / prefix limit"]["verdict"] == "FAIL"
    assert over["attack cpu forged / accepted"]["verdict"] == "not measured"


def test_a_class_run_not_answered_with_its_status_gives_no_ratio() -> None:
    runs = {"accepted": {"server_cpu_us_per_answer": 200.0, "answered": 100,
                         "statuses": {"201": 100}},
            "forged": {"server_cpu_us_per_answer": 300.0, "answered": 100,
                       "statuses": {"201": 100}},  # a verifier that let forgeries in
            "rate-limited": {"server_cpu_us_per_answer": 40.0, "answered": 100,
                             "statuses": {"201": 5, "429": 95}}}
    ratios = cpu_ratios(runs)
    assert ratios["forged"] is None and ratios["rate-limited"] == 0.2
