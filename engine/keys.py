"""Key material for tokens and receipts: created once on disk, loaded into a frozen KeyRing.

Layout of `<data_dir>/keys/` (directory mode 0700, secret files mode 0600):

    voter-token-keys.json     HMAC-SHA256 keys that sign voter tokens
    admin-token-keys.json     HMAC-SHA256 keys that sign admin tokens (a separate scope)
    receipt-signing-keys.json Ed25519 private keys (raw 32-byte seeds) that sign receipt batches
    voter-hash-keys.json      the secret that keys the per-poll voter hash in receipts
    receipt-public.json       the public half of the receipt keys, for offline verification

Every secret file is a key set, `{"kind", "current", "keys": {key_id: hex}}`, so rotation only
adds a key and moves `current`; older keys keep verifying what they signed.

Invariants:
- A secret file is created at most once. Concurrent `ensure_keys` callers (several workers
  starting together) each write a private temp file and publish it with `os.link`, which
  fails if the name exists, so exactly one candidate wins and everyone loads the winner's.
- A secret file is never rewritten in place; a reader sees either no file or a complete one.
  Rotation (`rotate_key_set`) and retirement (`retire_key`) of the token key sets publish a
  whole new file with `os.replace`, one change at a time under an exclusive lock on
  `<keys>/.rotation.lock`, so two operators never lose each other's change.
- The current key of a set is never retired: rotate first, then retire the old one.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.errors import VotesError

KEYS_DIR_NAME = "keys"
VOTER_TOKEN_FILE = "voter-token-keys.json"
ADMIN_TOKEN_FILE = "admin-token-keys.json"
RECEIPT_SIGNING_FILE = "receipt-signing-keys.json"
VOTER_HASH_FILE = "voter-hash-keys.json"
RECEIPT_PUBLIC_FILE = "receipt-public.json"

ROTATION_LOCK_FILE = ".rotation.lock"

KEY_FILE_BYTES_MAX = 64 * 1024
KEYS_PER_SET_MAX = 64
HMAC_KEY_BYTES = 32
HMAC_KEY_BYTES_MIN = 16
HMAC_KEY_BYTES_MAX = 64
ED25519_SEED_BYTES = 32
ED25519_PUBLIC_KEY_BYTES = 32
VOTER_HASH_SECRET_BYTES = 32

# Key ids travel inside tokens separated by ".", so they are restricted to a safe alphabet.
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")


class KeysMissing(VotesError):
    """Key material is missing."""


class KeysCorrupt(VotesError):
    """Key material is malformed."""


class KeyRotationRefused(VotesError):
    """The rotation or retirement asked for would break the key set; says why."""


class KeySetDocument(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    current: str
    keys: dict[str, str]


class PublicKeyDocument(msgspec.Struct, forbid_unknown_fields=True):
    """What third parties need to verify receipts offline: the current key and all older ones."""

    algorithm: str
    key_id: str
    public_key: str
    keys: dict[str, str]


@dataclass(frozen=True, eq=False)
class _KeySpec:
    file_name: str
    kind: str
    key_id_prefix: str
    secret_bytes: int
    secret_bytes_min: int
    secret_bytes_max: int


_VOTER_TOKEN = _KeySpec(VOTER_TOKEN_FILE, "voter-token-hmac-sha256", "v", HMAC_KEY_BYTES,
                        HMAC_KEY_BYTES_MIN, HMAC_KEY_BYTES_MAX)
_ADMIN_TOKEN = _KeySpec(ADMIN_TOKEN_FILE, "admin-token-hmac-sha256", "a", HMAC_KEY_BYTES,
                        HMAC_KEY_BYTES_MIN, HMAC_KEY_BYTES_MAX)
_RECEIPT_SIGNING = _KeySpec(RECEIPT_SIGNING_FILE, "receipt-ed25519", "r", ED25519_SEED_BYTES,
                            ED25519_SEED_BYTES, ED25519_SEED_BYTES)
_VOTER_HASH = _KeySpec(VOTER_HASH_FILE, "voter-hash-hmac-sha256", "h", VOTER_HASH_SECRET_BYTES,
                       VOTER_HASH_SECRET_BYTES, VOTER_HASH_SECRET_BYTES)
_SPECS = (_VOTER_TOKEN, _ADMIN_TOKEN, _RECEIPT_SIGNING, _VOTER_HASH)
# The key sets an operator rotates while servers run (they reload them, see TokenKeyWatch).
TOKEN_KEY_SETS = {"voter": _VOTER_TOKEN, "admin": _ADMIN_TOKEN}

_key_set_encoder = msgspec.json.Encoder()
_key_set_decoder = msgspec.json.Decoder(KeySetDocument)
_public_doc_decoder = msgspec.json.Decoder(PublicKeyDocument)


@dataclass(frozen=True, eq=False)
class KeyRing:
    """All key material one process needs. Identity-hashed so caches can key on it."""

    voter_keys: dict[str, bytes] = field(repr=False)
    voter_key_current: str
    admin_keys: dict[str, bytes] = field(repr=False)
    admin_key_current: str
    receipt_signing_key: Ed25519PrivateKey = field(repr=False)
    receipt_key_id: str
    receipt_public_key_bytes: bytes
    voter_hash_secret: bytes = field(repr=False)
    # Public keys of every receipt key id, current and rotated-out, for verifying old receipts.
    receipt_public_keys: dict[str, bytes] = field(default_factory=dict)


def keys_dir(data_dir: Path) -> Path:
    return Path(data_dir) / KEYS_DIR_NAME


def ensure_keys(data_dir: Path) -> None:
    """Create every missing key file once, then (re)write receipt-public.json to match.

    Safe to call from many processes at once; all of them end up loading the same keys.
    """
    directory = keys_dir(data_dir)
    created_dir = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if created_dir:
        _fsync_directory(directory.parent)
    for spec in _SPECS:
        path = directory / spec.file_name
        if not path.exists():
            publish_once(path, _encode_new_key_set(spec))
    write_public_key_document(data_dir, load_keys(data_dir))


def load_keys(data_dir: Path) -> KeyRing:
    """Load and validate every key file; KeysMissing / KeysCorrupt name the offending file."""
    directory = keys_dir(data_dir)
    voter_current, voter_keys = _load_key_set(directory, _VOTER_TOKEN)
    admin_current, admin_keys = _load_key_set(directory, _ADMIN_TOKEN)
    receipt_current, receipt_seeds = _load_key_set(directory, _RECEIPT_SIGNING)
    hash_current, hash_secrets = _load_key_set(directory, _VOTER_HASH)
    receipt_public_keys = {
        key_id: _public_bytes(Ed25519PrivateKey.from_private_bytes(seed))
        for key_id, seed in receipt_seeds.items()
    }
    return KeyRing(
        voter_keys=voter_keys,
        voter_key_current=voter_current,
        admin_keys=admin_keys,
        admin_key_current=admin_current,
        receipt_signing_key=Ed25519PrivateKey.from_private_bytes(receipt_seeds[receipt_current]),
        receipt_key_id=receipt_current,
        receipt_public_key_bytes=receipt_public_keys[receipt_current],
        voter_hash_secret=hash_secrets[hash_current],
        receipt_public_keys=receipt_public_keys,
    )


def public_key_document(keyring: KeyRing) -> dict[str, object]:
    """The JSON document third parties use to verify receipts offline."""
    return {
        "algorithm": "ed25519",
        "key_id": keyring.receipt_key_id,
        "public_key": keyring.receipt_public_key_bytes.hex(),
        "keys": {key_id: key.hex() for key_id, key in sorted(keyring.receipt_public_keys.items())},
    }


def write_public_key_document(data_dir: Path, keyring: KeyRing) -> Path:
    """Write receipt-public.json atomically unless it already holds exactly this content."""
    path = keys_dir(data_dir) / RECEIPT_PUBLIC_FILE
    content = _key_set_encoder.encode(public_key_document(keyring)) + b"\n"
    try:
        if path.read_bytes() == content:
            return path
    except FileNotFoundError:
        pass
    # The content is derived from the private keys, so concurrent writers write the same
    # bytes and a plain atomic replace is enough here.
    temp_path = _write_temp_file(path.parent, path.name, content, mode=0o644)
    os.replace(temp_path, path)
    _fsync_directory(path.parent)
    return path


def load_public_key_document(path: Path) -> dict[str, bytes]:
    """Read a receipt-public.json: key id -> raw 32-byte Ed25519 public key."""
    try:
        document = _public_doc_decoder.decode(_read_bounded(path))
        keys = {key_id: bytes.fromhex(key_hex) for key_id, key_hex in document.keys.items()}
        current = bytes.fromhex(document.public_key)
    except FileNotFoundError:
        raise KeysMissing(f"public key document {path} does not exist") from None
    except (msgspec.DecodeError, ValueError, OSError) as exc:
        raise KeysCorrupt(f"public key document {path} cannot be read: {exc}") from None
    if keys.setdefault(document.key_id, current) != current:
        raise KeysCorrupt(f"public key document {path} disagrees with itself on the current key")
    if any(len(key) != ED25519_PUBLIC_KEY_BYTES for key in keys.values()):
        raise KeysCorrupt(f"public key document {path} holds a key that is not 32 bytes")
    return keys


def new_key_id(prefix: str) -> str:
    return prefix + secrets.token_hex(4)


def _encode_new_key_set(spec: _KeySpec) -> bytes:
    key_id = new_key_id(spec.key_id_prefix)
    secret = secrets.token_bytes(spec.secret_bytes)
    document = KeySetDocument(kind=spec.kind, current=key_id, keys={key_id: secret.hex()})
    return _key_set_encoder.encode(document) + b"\n"


def _load_key_set(directory: Path, spec: _KeySpec) -> tuple[str, dict[str, bytes]]:
    path = directory / spec.file_name
    try:
        document = _key_set_decoder.decode(_read_bounded(path))
    except FileNotFoundError:
        raise KeysMissing(f"key file {path} does not exist; run ensure_keys first") from None
    except (msgspec.DecodeError, UnicodeDecodeError, OSError) as exc:
        raise KeysCorrupt(f"key file {path} cannot be read: {exc}") from None
    problem = _key_set_problem(document, spec)
    if problem:
        raise KeysCorrupt(f"key file {path} is malformed: {problem}")
    return document.current, {key_id: bytes.fromhex(hex_) for key_id, hex_ in document.keys.items()}


def _key_set_problem(document: KeySetDocument, spec: _KeySpec) -> str:
    """Return why the document is unusable, or "" when it is fine."""
    if document.kind != spec.kind:
        return f"kind is {document.kind!r}, expected {spec.kind!r}"
    if not 1 <= len(document.keys) <= KEYS_PER_SET_MAX:
        return f"holds {len(document.keys)} keys, expected 1 to {KEYS_PER_SET_MAX}"
    if document.current not in document.keys:
        return f"current key id {document.current!r} is not among the keys"
    for key_id, key_hex in document.keys.items():
        if not KEY_ID_PATTERN.fullmatch(key_id):
            return f"key id {key_id!r} is not 1-32 characters of [A-Za-z0-9_-]"
        try:
            secret = bytes.fromhex(key_hex)
        except ValueError:
            return f"key {key_id!r} is not hex"
        if not spec.secret_bytes_min <= len(secret) <= spec.secret_bytes_max:
            return f"key {key_id!r} is {len(secret)} bytes"
    return ""


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as file:
        content = file.read(KEY_FILE_BYTES_MAX + 1)
    if len(content) > KEY_FILE_BYTES_MAX:
        raise KeysCorrupt(f"key file {path} is larger than {KEY_FILE_BYTES_MAX} bytes")
    return content


def publish_once(path: Path, content: bytes, *, mode: int = 0o600) -> None:
    """Create `path` with `content` unless it exists, durably (file and directory fsynced,
    so a power cut leaves it whole or absent); never replaces an existing file."""
    temp_path = _write_temp_file(path.parent, path.name, content, mode=mode)
    try:
        os.link(temp_path, path)
    except FileExistsError:
        pass  # Another process won the race; its keys are the keys.
    finally:
        os.unlink(temp_path)
    _fsync_directory(path.parent)


def _write_temp_file(directory: Path, name: str, content: bytes, *, mode: int) -> str:
    descriptor, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with open(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.unlink(temp_path)
        raise
    return temp_path


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _public_bytes(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


# --- rotation of the token key sets ----------------------------------------------------------


@dataclass(frozen=True)
class KeySetView:
    """What an operator sees of a key set: its key ids and the current one, never secrets."""

    name: str
    current: str
    key_ids: tuple[str, ...]


def key_set_view(data_dir: Path, name: str) -> KeySetView:
    spec = _token_spec(name)
    current, keys = _load_key_set(keys_dir(data_dir), spec)
    return KeySetView(name, current, tuple(sorted(keys)))


def rotate_key_set(data_dir: Path, name: str) -> KeySetView:
    """Add a fresh key to the token key set `name` ("voter" or "admin") and make it current.

    Older keys stay in the set, so tokens they signed keep verifying until retired."""
    spec = _token_spec(name)
    with _rotation_lock(data_dir):
        current, keys = _load_key_set(keys_dir(data_dir), spec)
        if len(keys) >= KEYS_PER_SET_MAX:
            raise KeyRotationRefused(f"the {name} key set holds {len(keys)} keys already; "
                                     "retire old ones first")
        key_id = new_key_id(spec.key_id_prefix)
        while key_id in keys:
            key_id = new_key_id(spec.key_id_prefix)
        keys[key_id] = secrets.token_bytes(spec.secret_bytes)
        _replace_key_set(data_dir, spec, key_id, keys)
    return KeySetView(name, key_id, tuple(sorted(keys)))


def retire_key(data_dir: Path, name: str, key_id: str) -> KeySetView:
    """Remove `key_id` from the token key set `name`: tokens it signed stop verifying."""
    spec = _token_spec(name)
    with _rotation_lock(data_dir):
        current, keys = _load_key_set(keys_dir(data_dir), spec)
        if key_id not in keys:
            raise KeyRotationRefused(f"the {name} key set has no key {key_id!r}")
        if key_id == current:
            raise KeyRotationRefused(f"{key_id!r} is the current {name} key; rotate first")
        del keys[key_id]
        _replace_key_set(data_dir, spec, current, keys)
    return KeySetView(name, current, tuple(sorted(keys)))


def _token_spec(name: str) -> _KeySpec:
    spec = TOKEN_KEY_SETS.get(name)
    if spec is None:
        raise KeyRotationRefused(f"unknown key set {name!r}; expected one of "
                                 f"{', '.join(TOKEN_KEY_SETS)}")
    return spec


def _replace_key_set(data_dir: Path, spec: _KeySpec, current: str,
                     keys: dict[str, bytes]) -> None:
    document = KeySetDocument(kind=spec.kind, current=current,
                              keys={key_id: key.hex() for key_id, key in keys.items()})
    problem = _key_set_problem(document, spec)
    if problem:  # what we are about to publish must load again
        raise KeyRotationRefused(f"the new {spec.file_name} would be malformed: {problem}")
    path = keys_dir(data_dir) / spec.file_name
    temp_path = _write_temp_file(path.parent, path.name,
                                 _key_set_encoder.encode(document) + b"\n", mode=0o600)
    os.replace(temp_path, path)
    _fsync_directory(path.parent)


class _rotation_lock:
    """An exclusive flock on <keys>/.rotation.lock for one read-modify-replace of a key set."""

    def __init__(self, data_dir: Path) -> None:
        self.path = keys_dir(data_dir) / ROTATION_LOCK_FILE
        self.descriptor = -1

    def __enter__(self) -> None:
        if not self.path.parent.is_dir():
            raise KeysMissing(f"key directory {self.path.parent} does not exist")
        self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.descriptor, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.descriptor)  # closing releases the lock


class TokenKeyWatch:
    """Tells a running server when the token key files changed, so it can reload them.

    `changed()` costs two stat calls; the server calls it every `token_keys_check_s`, so a
    rotation or retirement reaches every worker within that bound, without a restart.
    Rotation replaces the files (new inode), so (inode, mtime, size) always moves."""

    def __init__(self, data_dir: Path) -> None:
        directory = keys_dir(data_dir)
        self.paths = tuple(directory / spec.file_name for spec in TOKEN_KEY_SETS.values())
        self.seen = self._stamp()

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.paths:
            try:
                status = os.stat(path)
                stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True


def reload_token_keys(data_dir: Path, keyring: KeyRing) -> KeyRing:
    """`keyring` with its voter and admin token key sets read again from disk (receipt keys
    unchanged: a running node keeps signing receipts with the key it started with)."""
    directory = keys_dir(data_dir)
    voter_current, voter_keys = _load_key_set(directory, _VOTER_TOKEN)
    admin_current, admin_keys = _load_key_set(directory, _ADMIN_TOKEN)
    return replace(keyring, voter_keys=voter_keys, voter_key_current=voter_current,
                   admin_keys=admin_keys, admin_key_current=admin_current)
