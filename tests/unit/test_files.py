import hashlib
import json
import os

import pytest

from vq_megatron.files import (atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file,
                               temp_path)


class Boom(Exception):
    pass


def test_temporary_names_are_unique_hidden_siblings(tmp_path):
    target = tmp_path / "data.bin"
    first, second = temp_path(target), temp_path(target, suffix=".part")
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(".data.bin.") and first.name.endswith(".tmp") and second.name.endswith(".part")


def test_success_renames_the_temporary_into_place(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()   # nothing under the final name meanwhile
        tmp.write_text("done")
    assert target.read_text() == "done" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_error_inside_the_block_leaves_neither_target_nor_temporary(tmp_path, error):
    with pytest.raises(error), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise error
    assert os.listdir(tmp_path) == []


def test_existing_target_is_replaced_or_left_intact(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("new, half written")
        raise Boom
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_write_helpers(tmp_path):
    atomic_write_bytes(tmp_path / "b", b"\x00\xff")
    atomic_write_text(tmp_path / "t", "héllo")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert (tmp_path / "b").read_bytes() == b"\x00\xff"
    assert (tmp_path / "t").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["b", "j.json", "t"]


def test_sha256_of_a_known_string(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 3000)   # several blocks
    assert sha256_file(big, block_size=1024) == hashlib.sha256(b"x" * 3000).hexdigest()
