"""Loading refuses a model that does not match its manifest, or a manifest not signed by a trusted key."""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import engine_settings
from jee1.edge.cli import main as jee1_cli
from jee1.edge.engine import Engine
from jee1.edge.model_check import ModelRejected, check_model, sign_manifest
from jee1.errors import InputError
from jee1.manifest import manifest_path


@pytest.fixture
def model(tmp_path, q4_merged):
    dst = tmp_path / "model" / "sm70.gguf"
    dst.parent.mkdir()
    shutil.copy2(q4_merged.output, dst)
    shutil.copy2(manifest_path(q4_merged.output), manifest_path(dst))
    return dst


@pytest.fixture
def keys(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(jee1_cli, ["keygen", "--private", str(tmp_path / f"{name}.key"),
                                          "--public", str(tmp_path / f"{name}.pub")])
        assert result.exit_code == 0, result.output
    assert oct((tmp_path / "a.key").stat().st_mode & 0o777) == "0o600"
    return tmp_path


def flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_matching_model_loads_and_the_result_is_cached(model, tmp_path):
    first = check_model(model, [], tmp_path / "cache")
    assert first.hashed and first.sha256 == json.loads(manifest_path(model).read_text())["model"]["sha256"]
    again = check_model(model, [], tmp_path / "cache")
    assert not again.hashed                      # size+mtime unchanged: no rehash after a reboot
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 1))
    assert check_model(model, [], tmp_path / "cache").hashed


def test_restoring_the_mtime_after_an_edit_does_not_fool_the_cache(model, tmp_path):
    """The attack, in real processes: verify (cached), flip a byte in place, put atime and mtime
    back with os.utime, verify again in a new process: it must rehash and refuse."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    check = ("import sys; from pathlib import Path; from jee1.edge.model_check import check_model, ModelRejected\n"
             "try:\n r = check_model(Path(sys.argv[1]), [], Path(sys.argv[2])); print('hashed' if r.hashed else 'cached')\n"
             "except ModelRejected as e:\n print('refused', e)\n")
    run = lambda: subprocess.run([sys.executable, "-c", check, str(model), str(cache)], capture_output=True,  # noqa: E731
                                 text=True, timeout=120).stdout
    assert run().startswith("hashed") and run().startswith("cached")
    assert (cache / "verified-models.json").stat().st_mode & 0o777 == 0o600
    st = model.stat()
    with open(model, "r+b") as f:                  # same size, same inode: an edit in place
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model.stat().st_mtime_ns == st.st_mtime_ns and model.stat().st_size == st.st_size
    assert run().startswith("refused")


def test_changed_model_is_refused(model, tmp_path):
    flip_byte(model)
    with pytest.raises(ModelRejected, match="sha256 .* differs from the manifest"):
        check_model(model, [], tmp_path / "cache")


def test_changed_model_is_refused_even_after_a_cached_pass(model, tmp_path):
    check_model(model, [], tmp_path / "cache")
    flip_byte(model)                              # new mtime: the cache no longer vouches for it
    with pytest.raises(ModelRejected, match="sha256"):
        check_model(model, [], tmp_path / "cache")


def test_truncated_model_is_refused(model, tmp_path):
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size - 10)
    with pytest.raises(ModelRejected, match="size .* differs"):
        check_model(model, [], tmp_path / "cache")


def test_missing_manifest_is_refused_unless_skipped(model, tmp_path):
    manifest_path(model).unlink()
    with pytest.raises(ModelRejected, match="no manifest"):
        Engine(engine_settings(model, tmp_path))
    with Engine(engine_settings(model, tmp_path, model={"verify": False}, answer={"max_tokens": 2})) as eng:
        assert eng.status()["verified"] == "not verified"


def test_signed_manifest_loads(model, keys, tmp_path):
    sign_manifest(manifest_path(model), keys / "a.key")
    result = check_model(model, [keys / "a.pub"], tmp_path / "cache")
    assert result.signed_by is not None
    settings = engine_settings(model, tmp_path, model={"trusted_keys": [str(keys / "b.pub"), str(keys / "a.pub")]},
                               answer={"max_tokens": 2})
    with Engine(settings) as eng:
        assert eng.status()["verified"].startswith("verified, signed by")


def test_unsigned_manifest_is_refused_when_keys_are_trusted(model, keys, tmp_path):
    with pytest.raises(ModelRejected, match="unsigned"):
        check_model(model, [keys / "a.pub"], tmp_path / "cache")


def test_signature_by_an_untrusted_key_is_refused(model, keys, tmp_path):
    sign_manifest(manifest_path(model), keys / "b.key")
    with pytest.raises(ModelRejected, match="does not verify with any trusted key"):
        check_model(model, [keys / "a.pub"], tmp_path / "cache")


def test_tampered_model_alone_is_refused(model, keys, tmp_path):
    sign_manifest(manifest_path(model), keys / "a.key")
    flip_byte(model)
    with pytest.raises(ModelRejected, match="sha256"):
        check_model(model, [keys / "a.pub"], tmp_path / "cache")


def test_tampered_manifest_alone_is_refused(model, keys, tmp_path):
    mpath = manifest_path(model)
    sign_manifest(mpath, keys / "a.key")
    data = json.loads(mpath.read_text())
    data["model"]["quant"] = "F16"                 # a plausible edit; hash and size untouched
    mpath.write_text(json.dumps(data, indent=2) + "\n")
    with pytest.raises(ModelRejected, match="does not verify"):
        check_model(model, [keys / "a.pub"], tmp_path / "cache")


def test_swapping_model_and_manifest_together_is_refused(model, keys, tmp_path, f16_merged):
    """A hash alone does not stop this; the signature does."""
    sign_manifest(manifest_path(model), keys / "a.key")
    shutil.copy2(f16_merged.output, model)
    shutil.copy2(manifest_path(f16_merged.output), manifest_path(model))
    assert check_model(model, [], tmp_path / "c1").sha256              # consistent pair: hash passes
    with pytest.raises(ModelRejected, match="does not verify"):
        check_model(model, [keys / "a.pub"], tmp_path / "c2")


def test_tampered_signature_alone_is_refused(model, keys, tmp_path):
    mpath = manifest_path(model)
    sig = sign_manifest(mpath, keys / "a.key")
    data = json.loads(sig.read_text())
    raw = bytearray(base64.b64decode(data["signature"]))
    raw[5] ^= 0x01
    data["signature"] = base64.b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(data))
    with pytest.raises(ModelRejected, match="does not verify"):
        check_model(model, [keys / "a.pub"], tmp_path / "cache")
    sig.write_text("{not json")
    with pytest.raises(ModelRejected, match="malformed signature"):
        check_model(model, [keys / "a.pub"], tmp_path / "cache")


def test_sign_cli_and_bad_key(model, keys, tmp_path):
    runner = CliRunner()
    result = runner.invoke(jee1_cli, ["sign", str(manifest_path(model)), "--key", str(keys / "a.key")])
    assert result.exit_code == 0 and manifest_path(model).with_name(manifest_path(model).name + ".sig").is_file()
    bad = runner.invoke(jee1_cli, ["sign", str(manifest_path(model)), "--key", str(keys / "a.pub")])
    assert bad.exit_code == 1 and "not a PEM Ed25519 private key" in bad.output
    again = runner.invoke(jee1_cli, ["keygen", "--private", str(keys / "a.key"), "--public", str(keys / "x.pub")])
    assert again.exit_code == 1 and "already exists" in again.output
    with pytest.raises(InputError, match="key file does not exist"):
        check_model(model, [tmp_path / "nope.pub"], None)


def test_a_refused_model_is_its_own_audit_event_with_the_reason(model, keys, tmp_path):
    audit = tmp_path / "audit.jsonl"
    flip_byte(model)
    with pytest.raises(ModelRejected):
        Engine(engine_settings(model, tmp_path))
    sign_manifest(manifest_path(model), keys / "b.key")
    with pytest.raises(ModelRejected):
        Engine(engine_settings(model, tmp_path, model={"trusted_keys": [str(keys / "a.pub")]}))
    manifest_path(model).unlink()
    with pytest.raises(ModelRejected):
        Engine(engine_settings(model, tmp_path))
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events] == ["model_refused"] * 3
    reasons = [e["reason"] for e in events]
    assert "sha256" in reasons[0] and "trusted key" in reasons[1] and "no manifest" in reasons[2]
    assert all(e["model"] == "sm70.gguf" for e in events)


def test_a_rename_during_the_check_cannot_get_an_unchecked_file_loaded(model, tmp_path):
    """The model is hashed and loaded through one open descriptor: a file renamed over the model's
    name while it is being checked is never what llama.cpp loads."""
    from jee1.gguf_info import read_gguf

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(model.stat().st_size))

    class SwapWhileHashing:
        swapped = False

        def update(self, n):
            if not self.swapped:
                os.replace(garbage, model)          # the attacker's rename, mid-check
                self.swapped = True

    swapper = SwapWhileHashing()
    with Engine(engine_settings(model, tmp_path, answer={"max_tokens": 2}), progress=swapper) as eng:
        assert swapper.swapped and eng.ask("What is the antidote for heparin?").completion_tokens > 0
        assert eng.status()["sha256"] == json.loads(manifest_path(model).read_text())["model"]["sha256"]
    with pytest.raises(Exception):
        read_gguf(model)                            # what the name now holds would not even load
    with pytest.raises(ModelRejected, match="sha256"):
        Engine(engine_settings(model, tmp_path / "next"))       # and the next start refuses it


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tiny_base, tiny_adapter):
    """The same model converted as release 1 and release 2 (each with its own manifest)."""
    from conftest import run_convert

    out = tmp_path_factory.mktemp("releases")
    return {v: run_convert(tiny_base, out / f"sm70-v{v}.F16.gguf", "F16", tiny_adapter, model_version=v).output
            for v in (1, 2)}


def _signed_settings(model_path, workdir, keys, **model):
    for path in {model_path, *(Path(p) for p in model.pop("extra", []))}:
        sign_manifest(manifest_path(path), keys / "a.key")
    return engine_settings(model_path, workdir, model={"trusted_keys": [str(keys / "a.pub")], **model})


def test_an_older_signed_release_is_refused_unless_downgrade_is_allowed(releases, keys, tmp_path):
    workdir = tmp_path / "device"
    with Engine(_signed_settings(releases[2], workdir, keys)):
        pass
    ledger = json.loads((workdir / "cache" / "accepted-versions.json").read_text())
    assert ledger["model"]["version"] == 2
    assert oct((workdir / "cache" / "accepted-versions.json").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ModelRejected, match="version 1 is older than version 2 .*allow_downgrade"):
        Engine(_signed_settings(releases[1], workdir, keys))
    audit = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "model_refused" and "older than version 2" in audit[-1]["reason"]
    with Engine(_signed_settings(releases[1], workdir, keys, allow_downgrade=True)):
        pass
    audit = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
    downgrade = [r for r in audit if r["event"] == "model_downgrade"]
    assert downgrade and downgrade[-1]["version"] == 1 and downgrade[-1]["replaced_version"] == 2
    assert json.loads((workdir / "cache" / "accepted-versions.json").read_text())["model"]["version"] == 1


def test_a_manifest_without_a_version_counts_as_zero(releases, keys, tmp_path, model):
    workdir = tmp_path / "device"
    with Engine(_signed_settings(releases[1], workdir, keys)):
        pass
    data = json.loads(manifest_path(model).read_text())
    data["model"].pop("version", None)                     # as written before versions existed
    manifest_path(model).write_text(json.dumps(data))
    with pytest.raises(ModelRejected, match="version 0 is older than version 1"):
        Engine(_signed_settings(model, workdir, keys))


def test_the_draft_is_tracked_apart_from_the_model(releases, keys, tmp_path):
    workdir = tmp_path / "device"
    with Engine(_signed_settings(releases[2], workdir, keys)):
        pass
    draft = {"draft": "model", "draft_model": str(releases[1])}
    settings = _signed_settings(releases[2], workdir, keys, extra=[releases[1]])
    settings.data["runtime"].update(draft)
    with Engine(settings):                                    # draft release 1 after model release 2: fine
        pass
    ledger = json.loads((workdir / "cache" / "accepted-versions.json").read_text())
    assert ledger["model"]["version"] == 2 and ledger["draft"]["version"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner to root or another user needs root")
def test_only_a_root_owned_read_only_model_is_loaded_when_protection_is_required(model, tmp_path):
    """llama.cpp maps the checked file; a write into it afterwards would change the weights in use.
    With model.require_protected (the device default) only a file that nobody but root can write is
    loaded; anything else is refused before hashing, and audited."""
    protected = {"require_protected": True}
    os.chown(model, 0, 0)
    os.chmod(model, 0o444)
    with Engine(engine_settings(model, tmp_path / "ok", model=protected, answer={"max_tokens": 2})) as eng:
        assert eng.verified == "verified"
    for owner, mode, reason in ((0, 0o664, "its group or other users may write it (mode 0664)"),
                                (0, 0o646, "mode 0646"), (65534, 0o444, "owned by uid 65534, not root")):
        os.chown(model, owner, 0)
        os.chmod(model, mode)
        with pytest.raises(ModelRejected, match=re.escape(reason)):
            Engine(engine_settings(model, tmp_path / f"no{mode}", model=protected))
        events = [json.loads(line) for line in (tmp_path / f"no{mode}" / "audit.jsonl").read_text().splitlines()]
        assert events[-1]["event"] == "model_refused" and reason in events[-1]["reason"]
    os.chown(model, 0, 0)
    os.chmod(model, 0o644)


def test_a_damaged_version_ledger_fails_closed(releases, keys, tmp_path):
    """An accepted-versions file that cannot be read could hide a downgrade: the model is refused
    until a deliberate, audited model.allow_downgrade, which rewrites the ledger."""
    workdir = tmp_path / "device"
    with Engine(_signed_settings(releases[2], workdir, keys)):
        pass
    ledger = workdir / "cache" / "accepted-versions.json"
    ledger.write_text("{ not json")
    with pytest.raises(ModelRejected, match="unreadable.*allow_downgrade"):
        Engine(_signed_settings(releases[1], workdir, keys))
    with Engine(_signed_settings(releases[1], workdir, keys, allow_downgrade=True)):
        pass
    audit = [json.loads(line) for line in (workdir / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in audit if r["event"] in ("model_refused", "model_downgrade")][-2:] == \
        ["model_refused", "model_downgrade"]
    assert json.loads(ledger.read_text())["model"]["version"] == 1
