"""Before loading: the model must match its manifest, and the manifest its signature.

* Size and sha256 from ``<model>.manifest.json``.  Hashing 41 GB takes minutes, so it shows
  progress and the result is cached keyed by device, inode, size, mtime and ctime: a reboot does
  not rehash, and restoring an mtime with ``utime`` after an edit does not fool it.
* With trusted keys configured, ``<manifest>.sig`` (written by ``jee1 sign``) must be a valid
  Ed25519 signature over the manifest's exact bytes by one of them.  The signature is checked
  on every load; it is cheap.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jee1.errors import InputError, VerificationError
from jee1.manifest import manifest_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

SIGNATURE_SUFFIX = ".sig"
VERIFIED_CACHE = "verified-models.json"
ACCEPTED_VERSIONS = "accepted-versions.json"


class ModelRejected(VerificationError):
    """The model, its manifest or its signature failed a check; it was not loaded."""


@dataclass
class CheckResult:
    manifest: dict
    sha256: str
    hashed: bool          # False: the verified-result cache answered
    signed_by: str | None  # key id of the trusted key that signed the manifest
    file: BinaryIO | None = None   # the open file that was checked: load this one, then close() it

    @property
    def load_path(self) -> str | None:
        """A path that reaches the very file that was checked, whatever is renamed over the model's
        name meanwhile (Linux: /proc/self/fd/N); None where there is no such path."""
        proc = Path(f"/proc/self/fd/{self.file.fileno()}") if self.file is not None else None
        return str(proc) if proc is not None and proc.exists() else None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM (private key 0600); returns the key id."""
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path}: already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    private_path.touch(mode=0o600)
    private_path.write_bytes(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


def _load_key(path: Path, private: bool):
    try:
        data = path.read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except FileNotFoundError:
        raise InputError(f"{path}: key file does not exist") from None
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: not a PEM Ed25519 {'private' if private else 'public'} key ({e})") from None
    expected = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, expected):
        raise InputError(f"{path}: not an Ed25519 key")
    return key


def sign_manifest(manifest: Path, private_key: Path) -> Path:
    """Write ``<manifest>.sig``: Ed25519 over the manifest file's exact bytes."""
    key = _load_key(private_key, private=True)
    try:
        data = manifest.read_bytes()
        json.loads(data)
    except FileNotFoundError:
        raise InputError(f"{manifest}: manifest does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{manifest}: not a manifest (invalid JSON: {e})") from None
    signature = {"algorithm": "ed25519", "key_id": key_id(key.public_key()),
                 "signature": base64.b64encode(key.sign(data)).decode()}
    out = manifest.with_name(manifest.name + SIGNATURE_SUFFIX)
    write_json_atomic(out, signature)
    return out


def _check_signature(manifest: Path, data: bytes, trusted: list[Path]) -> str:
    sig_path = manifest.with_name(manifest.name + SIGNATURE_SUFFIX)
    try:
        sig = json.loads(sig_path.read_text())
        signature = base64.b64decode(sig["signature"], validate=True)
    except FileNotFoundError:
        raise ModelRejected(f"{manifest}: unsigned (no {sig_path.name}) and this device requires a signature") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelRejected(f"{sig_path}: malformed signature file ({e})") from None
    for path in trusted:
        public = _load_key(Path(path), private=False)
        try:
            public.verify(signature, data)
            return key_id(public)
        except InvalidSignature:
            continue
    raise ModelRejected(f"{sig_path}: signature does not verify with any trusted key "
                        f"({', '.join(str(p) for p in trusted)})")


class VerifiedCache:
    """Models that hashed clean, keyed by what user space cannot set back: device, inode, size,
    mtime and ctime in nanoseconds (``utime`` can restore an mtime, but it moves the ctime to now).
    A small JSON file, mode 0600."""

    def __init__(self, directory: Path | None):
        self.path = Path(directory) / VERIFIED_CACHE if directory else None

    @staticmethod
    def identity(st: os.stat_result) -> dict:
        return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns}

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable verified-model cache, ignoring it", self.path)
            return {}

    def lookup(self, model: Path, st: os.stat_result | None = None) -> str | None:
        entry = self._read().get(str(model.resolve()))
        if entry and {k: entry.get(k) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")} == \
                self.identity(st or model.stat()):
            return entry["sha256"]
        return None

    def store(self, model: Path, sha256: str, st: os.stat_result | None = None) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read()
            data[str(model.resolve())] = self.identity(st or model.stat()) | {"sha256": sha256}
            write_json_atomic(self.path, data, mode=0o600)
        except OSError as e:
            log.warning("%s: cannot cache the verification result (%s)", self.path, e.strerror)


def unprotected(st: os.stat_result) -> str | None:
    """Why someone other than root could write the model file, or None.  A write into the file after
    the check reaches the weights llama.cpp has memory-mapped, so only root may be able to write it."""
    if st.st_uid != 0:
        return f"it is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"its group or other users may write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_model(model: Path, trusted_keys: list[Path], cache_dir: Path | None, progress=None,
                require_protected: bool = False) -> CheckResult:
    """Refuse (ModelRejected) unless model, manifest and signature agree (and, with
    ``require_protected``, only root can write the model file)."""
    model = Path(model)
    mpath = manifest_path(model)
    if not model.is_file():
        raise InputError(f"{model}: model file does not exist")
    try:
        data = mpath.read_bytes()
        manifest = json.loads(data)
        expected_size, expected_sha = manifest["model"]["size"], manifest["model"]["sha256"]
    except FileNotFoundError:
        raise ModelRejected(f"{model}: no manifest ({mpath.name}); refusing an unverifiable model") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelRejected(f"{mpath}: malformed manifest ({e})") from None
    signed_by = _check_signature(mpath, data, trusted_keys) if trusted_keys else None
    try:
        f = open(model, "rb")     # hashed and then loaded through this one descriptor
    except OSError as e:
        raise InputError(f"{model}: cannot open the model ({e.strerror})") from None
    try:
        before = os.fstat(f.fileno())
        if require_protected and (problem := unprotected(before)):
            raise ModelRejected(f"{model}: {problem}; whoever can write it could change the weights after the "
                                f"check, while they are memory-mapped. Make it root-owned and read-only "
                                f"(chown root:root, chmod 0444), or for development set "
                                f"model.require_protected = false")
        if before.st_size != expected_size:
            raise ModelRejected(f"{model}: size {before.st_size} differs from the manifest's {expected_size}")
        cache = VerifiedCache(cache_dir)
        cached = cache.lookup(model, before)
        if cached == expected_sha:
            if progress is not None:
                progress.update(before.st_size)  # verified before, the same file unchanged: no re-hash
            return CheckResult(manifest, cached, hashed=False, signed_by=signed_by, file=f)
        log.info("verifying %s (%.1f GiB) against its manifest", model.name, before.st_size / 2**30)
        actual = sha256_file(f, progress)
        if actual != expected_sha:
            raise ModelRejected(f"{model}: sha256 {actual[:16]}… differs from the manifest's {expected_sha[:16]}…")
        if VerifiedCache.identity(os.fstat(f.fileno())) == VerifiedCache.identity(before):   # unchanged meanwhile
            cache.store(model, actual, before)
        return CheckResult(manifest, actual, hashed=True, signed_by=signed_by, file=f)
    except BaseException:
        f.close()
        raise


class VersionLedger:
    """The newest model version this device has accepted, per role ("model", "draft"), in device
    state (cache.dir, mode 0600).  A signed manifest of an older release is refused: without this,
    whoever holds an old signed model could install it in place of a fixed one.  A manifest without
    ``model.version`` counts as version 0."""

    def __init__(self, directory: Path | None):
        self.path = Path(directory) / ACCEPTED_VERSIONS if directory else None

    def _read(self) -> dict | None:
        """The ledger; None when the file exists but cannot be read or parsed (damaged or tampered)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict):
            log.warning("%s: unreadable accepted-versions file", self.path)
            return None
        return data

    def newest(self, role: str) -> dict | None:
        return (self._read() or {}).get(role)

    def check(self, role: str, model: Path, manifest: dict, allow_downgrade: bool) -> tuple[int, dict | None]:
        """(version, the newest accepted before when this is a downgrade); ModelRejected for a
        downgrade that is not allowed."""
        version = manifest.get("model", {}).get("version", 0)
        if not isinstance(version, int) or version < 0:
            raise ModelRejected(f"{manifest_path(model)}: model.version {version!r} is not a whole number")
        ledger = self._read()
        if ledger is None:   # fail closed: this may be a downgrade that nothing can rule out
            if not allow_downgrade:
                raise ModelRejected(
                    f"{self.path}: unreadable, so the device cannot tell whether {model.name} is older than the "
                    f"{role} it accepted before; set model.allow_downgrade = true once to accept it (audited)")
            return version, {"version": -1, "name": f"(unreadable {ACCEPTED_VERSIONS})"}
        newest = ledger.get(role)
        if newest is not None and version < newest["version"]:
            if not allow_downgrade:
                raise ModelRejected(
                    f"{model}: version {version} is older than version {newest['version']} ({newest['name']}) "
                    f"this device accepted as its {role}; a deliberate downgrade needs model.allow_downgrade = true")
            return version, newest
        return version, None

    def accept(self, role: str, model: Path, version: int, sha256: str | None) -> None:
        """Record ``version`` as the newest for ``role`` (after a deliberate downgrade too)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read() or {}
            entry = {"version": version, "name": model.name, "sha256": sha256}
            if data.get(role) != entry:   # an unchanged start writes nothing
                data[role] = entry
                write_json_atomic(self.path, data, mode=0o600)
        except OSError as e:
            log.warning("%s: cannot record the accepted version (%s)", self.path, e.strerror)
