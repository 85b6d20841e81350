"""schemathesis against engine/openapi.yaml on a real `votes serve` (embedded log, one worker).

Every operation the ingest role serves gets EXAMPLES_PER_OPERATION generated requests, valid
and invalid ones (schemathesis's positive and negative modes); every answer must be no 5xx,
have a documented status, content type and headers, and a body the document allows, and
an invalid request must not be accepted (2xx). Valid tokens come from a schemathesis auth
provider (an admin token for the admin operations, a fresh voter token per vote), and the
poll and option generators are mixed with an open and a closed poll of the server and their
options, so the generated requests reach past 401 and 404 to votes, closes and streams.

Not covered: /v1/voter-tokens (the issuer role, a separate process with an OIDC provider and
PostgreSQL) and /v1/challenge (reserved in the document; no role serves it yet).
The seed is printed by hypothesis on failure; VOTES_SCHEMATHESIS_EXAMPLES sets the count.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.vote_client import bearer

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "engine" / "openapi.yaml"
EXAMPLES_PER_OPERATION = int(os.environ.get("VOTES_SCHEMATHESIS_EXAMPLES", "50"))
OPEN_POLL = "schemathesis-open"
CLOSED_POLL = "schemathesis-closed"
OPTIONS = ["a", "b"]
VOTER_TOKENS = 3000  # more than the votes EXAMPLES_PER_OPERATION can send, with shrinking
REQUEST_TIMEOUT_S = 10.0
NOT_SERVED = ["createVoterToken", "getChallenge"]  # see the module docstring
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]

schema = schemathesis.openapi.from_path(OPENAPI_PATH)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=EXAMPLES_PER_OPERATION)
served = schema.exclude(operation_id=NOT_SERVED)


class Tokens:
    """The server's tokens, filled in by the `engine` fixture before any case runs."""

    admin = ""
    receipt = ""  # of a counted vote, mixed into the receipt look-ups
    voters: itertools.chain[str] | None = None
    # (operation, status) of every answer: printed at the end, so a run shows how far the
    # generated requests got (201 votes, 200 closes) and not only that nothing failed.
    answers: Counter[tuple[str, int]] = Counter()


@served.auth(refresh_interval=None)
class EngineTokens:
    """An admin token where the operation asks for one, a fresh voter token per vote."""

    def get(self, case, context) -> str | None:
        security = case.operation.definition.raw.get("security", [])
        names = {name for requirement in security for name in requirement}
        if "adminToken" in names:
            return Tokens.admin
        if "voterToken" in names and Tokens.voters is not None:
            return next(Tokens.voters)
        return None

    def set(self, case, data, context) -> None:
        if data is not None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@served.hook
def before_generate_path_parameters(context, strategy):
    if "{poll}" in context.operation.path:
        return st.one_of(strategy, st.sampled_from([{"poll": OPEN_POLL}, {"poll": CLOSED_POLL}]))
    if "{receipt}" in context.operation.path:
        return st.one_of(strategy, st.builds(lambda: {"receipt": Tokens.receipt}))
    return strategy


@served.hook
def before_generate_body(context, strategy):
    if context.operation.definition.raw.get("operationId") == "castVote":
        return st.one_of(strategy, st.sampled_from([{"option": option} for option in OPTIONS]))
    return strategy


@pytest.fixture(scope="module")
def engine(server_factory):
    server = server_factory()
    admin = server.admin_token()
    client = server.client()
    for poll in (OPEN_POLL, CLOSED_POLL):
        answer = client.post("/v1/polls", headers=bearer(admin), json={"id": poll,
                                                                       "options": OPTIONS})
        assert answer.status_code == 201, answer.text
    assert client.post(f"/v1/polls/{CLOSED_POLL}/close", headers=bearer(admin)).status_code == 200
    voters = server.voter_tokens(1, VOTER_TOKENS)
    vote = client.post(f"/v1/polls/{OPEN_POLL}/votes", headers=bearer(voters[0]),
                       json={"option": OPTIONS[0]})
    assert vote.status_code == 201, vote.text
    Tokens.admin, Tokens.receipt, Tokens.voters = admin, vote.json()["receipt"], iter(voters[1:])
    yield server
    print(f"\n[schemathesis] {EXAMPLES_PER_OPERATION} examples per operation and mode; "
          f"answers by operation and status: {dict(sorted(Tokens.answers.items()))}")


@served.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_the_server_keeps_the_contract(case, engine) -> None:
    # An open poll's stream lasts until the poll is closed: its answer would never end. And
    # the open poll stays open, so votes keep reaching the log.
    operation = case.operation.definition.raw["operationId"]
    if operation in ("streamResults", "closePoll") \
            and (case.path_parameters or {}).get("poll") == OPEN_POLL:
        case.path_parameters = {**case.path_parameters, "poll": CLOSED_POLL}
    response = case.call_and_validate(base_url=engine.base_url, checks=CHECKS,
                                      timeout=REQUEST_TIMEOUT_S)
    Tokens.answers[operation, response.status_code] += 1
