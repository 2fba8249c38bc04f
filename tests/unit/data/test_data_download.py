"""C4 downloader, exercised against a local file:// mirror (no network)."""

import pytest

from vq_megatron.data import download
from vq_megatron.data.download import DEFAULT_BASE_URL, download_c4, shard_name, shard_url


def _mirror(tmp_path, split, count):
    root = tmp_path / "mirror"
    (root / "en").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (root / "en" / shard_name(split, index)).write_bytes(f"{split} shard {index}\n".encode() * 1000)
    return root


def test_shard_names_and_urls():
    assert shard_name("train", 0) == "c4-train.00000-of-01024.json.gz"
    assert shard_name("validation", 7) == "c4-validation.00007-of-00008.json.gz"
    assert shard_url(DEFAULT_BASE_URL, "train", 3) == (
        "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00003-of-01024.json.gz"
    )
    with pytest.raises(ValueError, match="0..7"):
        shard_name("validation", 8)
    with pytest.raises(ValueError, match="split"):
        shard_name("test", 0)


def test_download_from_file_url_and_skip_existing(tmp_path):
    mirror = _mirror(tmp_path, "validation", 3)
    out = tmp_path / "out"
    paths = download_c4(out, 2, split="validation", base_url=mirror.as_uri())
    assert [p.name for p in paths] == [shard_name("validation", i) for i in range(2)]
    for path in paths:
        assert path.read_bytes() == (mirror / "en" / path.name).read_bytes()
    # Present files are kept as they are, even if they differ from the mirror.
    paths[0].write_bytes(b"local copy")
    again = download_c4(out, 3, split="validation", base_url=mirror.as_uri())
    assert again[0].read_bytes() == b"local copy"
    assert again[2].read_bytes() == (mirror / "en" / again[2].name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [shard_name("validation", i) for i in range(3)]


def test_env_base_url_and_start(tmp_path, monkeypatch):
    mirror = _mirror(tmp_path, "train", 3)
    monkeypatch.setenv("C4_BASE_URL", mirror.as_uri())
    paths = download_c4(tmp_path / "out", 1, split="train", start=2)
    assert [p.name for p in paths] == ["c4-train.00002-of-01024.json.gz"]


def test_missing_remote_file_leaves_nothing(tmp_path):
    mirror = _mirror(tmp_path, "train", 1)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="c4-train.00001-of-01024.json.gz"):
        download_c4(out, 2, split="train", base_url=mirror.as_uri())
    assert [p.name for p in out.iterdir()] == ["c4-train.00000-of-01024.json.gz"]


def test_cli(tmp_path, capsys):
    mirror = _mirror(tmp_path, "validation", 1)
    argv = ["--c4-shards", "1", "--split", "validation", "--out-dir", str(tmp_path / "o"),
            "--base-url", mirror.as_uri()]
    assert download.main(argv) == 0
    assert "c4-validation.00000-of-00008.json.gz" in capsys.readouterr().out
    assert download.main(argv[:-1] + [(tmp_path / "nowhere").as_uri(), "--start", "1"]) == 1
