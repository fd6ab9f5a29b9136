"""The checksummed, settings-keyed store: round trip, and every kind of damage found in one warning line."""
import json
import warnings

import pytest
import torch

from cap_lab import store

PAYLOAD = {"model": {"name": "tiny", "fingerprint": "abc"}, "tokens_sha256": "0f" * 32, "n": 3}
SHAPES = {"masked": (2, 3), "intact": (2,)}


def _save(root, **kw):
    tensors = {"masked": torch.arange(6.0).view(2, 3), "intact": torch.ones(2)}
    return store.save(root, PAYLOAD, {"note": "first", "score": 0.25}, tensors=tensors,
                      files={"records.jsonl": '{"uid": 1}\n{"uid": 2}\n'}, **kw)


def _load_damaged(root, match: str, **kw):
    """Load, asserting exactly one one-line warning that names the folder and ``match``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = store.load(root, PAYLOAD, shapes=SHAPES, **kw)
    messages = [str(w.message) for w in caught]
    assert entry is None and len(messages) == 1, messages
    assert "\n" not in messages[0] and match in messages[0] and str(store.entry_folder(root, PAYLOAD)) in messages[0]
    assert messages[0].startswith("cap_lab: ignoring corrupt cache entry") and messages[0].endswith("recomputing")


def _flip_byte(path, at: int):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def root(tmp_path):
    return tmp_path / "entries"


def test_round_trip_and_folder_name(root):
    folder = _save(root, prefix="gsm8k-cot-")
    assert folder.name == "gsm8k-cot-" + store.entry_key(PAYLOAD) and len(store.entry_key(PAYLOAD)) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = store.load(root, PAYLOAD, prefix="gsm8k-cot-", shapes=SHAPES)
        assert store.load(root, dict(PAYLOAD, n=4), prefix="gsm8k-cot-") is None  # absent: no warning
    assert entry.folder == folder and entry.metadata == {"note": "first", "score": 0.25}
    assert entry.payload == PAYLOAD and torch.equal(entry.tensors["masked"], torch.arange(6.0).view(2, 3))
    assert (folder / "records.jsonl").read_text().count("\n") == 2
    manifest = json.loads((folder / store.MANIFEST).read_text())
    assert set(manifest["files"]) == {"records.jsonl", store.TENSORS} and manifest["format_version"] == store.FORMAT_VERSION
    again = store.save(root, PAYLOAD, {"note": "second"}, prefix="gsm8k-cot-")  # replaces, never appends
    assert again == folder and store.load(root, PAYLOAD, prefix="gsm8k-cot-").metadata == {"note": "second"}
    assert not (folder / store.TENSORS).exists() and sorted(p.name for p in root.iterdir()) == [folder.name]


def test_key_covers_the_payload_and_the_format_version(monkeypatch):
    key = store.entry_key(PAYLOAD)
    assert store.entry_key(dict(reversed(list(PAYLOAD.items())))) == key  # key order does not matter
    assert store.entry_key(dict(PAYLOAD, tokens_sha256="1f" * 32)) != key
    monkeypatch.setattr(store, "FORMAT_VERSION", "999")
    assert store.entry_key(PAYLOAD) != key


def test_flipped_byte_in_the_tensors_still_parses_but_is_caught(root):
    folder = _save(root)
    _flip_byte(folder / store.TENSORS, -1)  # the last byte of a float: still a valid file
    _load_damaged(root, f"checksum of {store.TENSORS} differs")
    with pytest.warns(UserWarning, match="checksum"):  # still damaged: reported again
        assert store.load(root, PAYLOAD, shapes=SHAPES) is None
    _save(root)  # the next save replaces it
    assert store.load(root, PAYLOAD, shapes=SHAPES) is not None


def test_flipped_byte_in_a_text_file_and_in_the_manifest(root):
    folder = _save(root)
    text = (folder / "records.jsonl").read_text()
    (folder / "records.jsonl").write_text(text.replace("2", "3"))  # same size, still JSON lines
    _load_damaged(root, "checksum of records.jsonl differs")
    folder = _save(root)
    manifest = (folder / store.MANIFEST).read_text()
    (folder / store.MANIFEST).write_text(manifest.replace("0.25", "0.35"))  # metadata edited, still JSON
    _load_damaged(root, f"checksum of {store.MANIFEST} differs")
    (folder / store.MANIFEST).write_text(manifest[: len(manifest) // 2])
    _load_damaged(root, f"{store.MANIFEST} is not JSON")


@pytest.mark.parametrize("keep", [0, 5])
def test_emptied_or_truncated_file(root, keep):
    folder = _save(root)
    (folder / "records.jsonl").write_bytes((folder / "records.jsonl").read_bytes()[:keep])
    _load_damaged(root, f"records.jsonl has {keep} bytes, expected 22")


@pytest.mark.parametrize("name", [store.TENSORS, "records.jsonl", store.MANIFEST])
def test_missing_file(root, name):
    folder = _save(root)
    (folder / name).unlink()
    _load_damaged(root, f"{name} is missing")


def test_wrong_shape_nan_and_a_caller_check_are_rejected(root):
    store.save(root, PAYLOAD, tensors={"masked": torch.zeros(3, 2), "intact": torch.ones(2)})
    _load_damaged(root, "tensor 'masked' has shape (3, 2), expected (2, 3)")
    store.save(root, PAYLOAD, tensors={"masked": torch.zeros(2, 3), "intact": torch.tensor([1.0, float("nan")])})
    _load_damaged(root, "tensor 'intact' has NaN or infinite values")
    store.save(root, PAYLOAD, tensors={"masked": torch.zeros(2, 3)})
    _load_damaged(root, "tensors ['masked'], expected ['intact', 'masked']")
    _save(root)

    def refuse(entry):
        raise ValueError(f"note is {entry.metadata['note']!r}")

    _load_damaged(root, "note is 'first'", validate=refuse)


def test_payload_mismatch_in_the_manifest(root):
    folder = _save(root)
    other = store.save(root, dict(PAYLOAD, n=4), {"note": "other"})
    folder.rename(root / "old")
    other.rename(folder)  # an entry with the right name but another payload
    _load_damaged(root, "its payload differs from the requested one")


def test_bad_file_names_are_refused(root):
    with pytest.raises(ValueError, match="'entry.json'"):
        store.save(root, PAYLOAD, files={"entry.json": "{}"})
    with pytest.raises(ValueError, match="plain names"):
        store.save(root, PAYLOAD, files={"../x.txt": "x"})


def test_a_concurrent_save_of_the_same_entry_is_kept(root, monkeypatch):
    import errno
    import os
    import shutil

    _save(root)

    def rename_after_the_other_writer(src, dst):  # the other process renamed its whole copy in first
        shutil.copytree(src, dst)
        raise OSError(errno.ENOTEMPTY, "Directory not empty", dst)

    monkeypatch.setattr(os, "rename", rename_after_the_other_writer)
    assert _save(root) == store.entry_folder(root, PAYLOAD)
    monkeypatch.undo()
    assert store.load(root, PAYLOAD, shapes=SHAPES).metadata["note"] == "first"
    assert [p.name for p in root.iterdir()] == [store.entry_key(PAYLOAD)]  # no temporary folder left
