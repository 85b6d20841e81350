"""The security headers of every HTTP answer the roles send (ingest, results, issuer).

Two sets, chosen by what the answer is:
- `PAGE_HEADERS` for the results page and its static files: a Content-Security-Policy that
  admits scripts, styles and connections from this origin only (no inline script or style:
  the page has none), no framing, no referrer, no MIME sniffing, its own browsing context
  group; cacheable for a minute (the same bytes for every poll).
- `API_HEADERS` for JSON, problem+json, text and event-stream answers, which no browser
  should render, frame or sniff into HTML (the OWASP REST guidance): `default-src 'none'`
  and `frame-ancestors 'none'`, nosniff, no referrer. Caching stays each route's choice
  (the results role's results are cacheable; issued tokens say no-store themselves).
An answer carries exactly one of the two sets, added where the role sends it.
"""

from __future__ import annotations

PAGE_HEADERS: list[tuple[str, str]] = [
    ("content-security-policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cache-control", "public, max-age=60"),
]

API_HEADERS: list[tuple[str, str]] = [
    ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
]
