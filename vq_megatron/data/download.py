"""Download English C4 shards (allenai/c4, ``en/``) from the Hugging Face Hub.

Usage::

    python -m vq_megatron.data.download --c4-shards 2 --split train --out-dir ../shared/data/c4

Files already present are kept. Each file is fetched to a temporary name in the
target directory and renamed when complete, so an interrupted download never
leaves a truncated shard under its final name. ``--base-url`` (or env
``C4_BASE_URL``) points at a mirror; any URL urllib opens works, ``file://`` too.

C4 is released by AllenAI under ODC-BY 1.0; use is also subject to the Common
Crawl terms of use.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from ..files import atomic_path

__all__ = ["DEFAULT_BASE_URL", "SHARDS_PER_SPLIT", "shard_name", "shard_url", "download_c4", "main"]

logger = logging.getLogger("vq_megatron.data.download")

DEFAULT_BASE_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main"
SHARDS_PER_SPLIT = {"train": 1024, "validation": 8}
_RETRIES = 3
_CHUNK = 1 << 20


def shard_name(split: str, index: int) -> str:
    """File name of one shard, e.g. ``c4-train.00000-of-01024.json.gz``."""
    if split not in SHARDS_PER_SPLIT:
        raise ValueError(f"split must be one of {sorted(SHARDS_PER_SPLIT)}, got {split!r}")
    total = SHARDS_PER_SPLIT[split]
    if not 0 <= index < total:
        raise ValueError(f"{split} has shards 0..{total - 1}, got {index}")
    return f"c4-{split}.{index:05d}-of-{total:05d}.json.gz"


def shard_url(base_url: str, split: str, index: int) -> str:
    """URL of one shard under ``<base_url>/en/``."""
    return f"{base_url.rstrip('/')}/en/{shard_name(split, index)}"


def _fetch(url: str, target: Path, timeout: float) -> int:
    """Copy url to target via a temporary file in the same directory; return bytes written."""
    with atomic_path(target, suffix=".part") as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "xb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
            size = out.tell()
            expected = response.headers.get("Content-Length")
        if expected is not None and int(expected) != size:
            raise OSError(f"incomplete download of {url}: {size} of {expected} bytes")
    return size


def download_c4(
    out_dir: str | Path,
    num_shards: int,
    split: str = "train",
    start: int = 0,
    base_url: str | None = None,
    timeout: float = 60.0,
) -> list[Path]:
    """Download shards ``start .. start+num_shards-1`` of a C4 ``en`` split into ``out_dir``.

    Args:
        out_dir: target directory (created if missing).
        num_shards: number of shards (train has 1024, validation 8).
        split: ``"train"`` or ``"validation"``.
        start: index of the first shard.
        base_url: repository root; default env ``C4_BASE_URL`` or :data:`DEFAULT_BASE_URL`.
        timeout: seconds per network operation.

    Returns:
        Paths of all requested shards (downloaded now or already present), in order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base_url = base_url or os.environ.get("C4_BASE_URL") or DEFAULT_BASE_URL
    names = [shard_name(split, i) for i in range(start, start + num_shards)]  # validates the range
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names, start=start):
        target = out / name
        paths.append(target)
        if target.exists():
            logger.info("%s: present, skipped", target)
            continue
        url = shard_url(base_url, split, index)
        retries = 1 if url.startswith("file:") else _RETRIES  # a missing local file stays missing
        for attempt in range(1, retries + 1):
            try:
                started = time.perf_counter()
                size = _fetch(url, target, timeout)
                logger.info("%s: %.1f MB in %.1fs", target, size / 1e6, time.perf_counter() - started)
                break
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == retries:  # 404 and friends will not get better
                    raise OSError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
            except (urllib.error.URLError, OSError) as err:
                if attempt == retries:
                    raise OSError(f"cannot download {url}: {err}") from err
            logger.warning("%s: attempt %d failed, retrying", url, attempt)
            time.sleep(2**attempt)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m vq_megatron.data.download --c4-shards N --split train|validation``."""
    parser = argparse.ArgumentParser(
        prog="python -m vq_megatron.data.download",
        description="Download English C4 shards (allenai/c4, ODC-BY 1.0) as c4-<split>.NNNNN-of-MMMMM.json.gz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--c4-shards", type=int, required=True, help="number of shards to fetch")
    parser.add_argument("--split", choices=sorted(SHARDS_PER_SPLIT), default="train", help="C4 split")
    parser.add_argument("--start", type=int, default=0, help="index of the first shard")
    parser.add_argument("--out-dir", required=True, help="directory for the .json.gz shards")
    parser.add_argument("--base-url", default=None,
                        help=f"repository root holding en/ (default: env C4_BASE_URL or {DEFAULT_BASE_URL})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network operation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = download_c4(args.out_dir, args.c4_shards, args.split, args.start, args.base_url, args.timeout)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
