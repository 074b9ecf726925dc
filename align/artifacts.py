"""Stage outputs on disk: fingerprints, manifests and atomic publishing.

A stage writes into a work folder; only when it succeeds is the folder given its manifest and renamed
to ``<run_dir>/<stage>``. So a published folder is always complete, and a folder that is not there (or
whose manifest fingerprint differs) means the stage must run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "fingerprint", "hash_file", "read_manifest", "tokenizer_identity"]

#: The manifest's file name inside a published artifact folder.
MANIFEST = "align-manifest.json"
#: Bumped when the manifest's layout changes incompatibly.
MANIFEST_FORMAT = 1

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


def fingerprint(payload: Any) -> str:
    """A stable hash of JSON-able data (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_identity(folder: Path) -> dict[str, str] | None:
    """Hashes of a checkpoint's tokenizer and chat template, or None when it has no tokenizer files.

    Two stages that must share a tokenizer (a policy and its reward model) compare these before any
    training starts; a mismatch would otherwise surface as silently wrong rewards.
    """
    vocab = [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    if not vocab:
        return None
    template = ""
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = json.dumps(config.get("chat_template") or "")
    return {
        "tokenizer": fingerprint({p.name: hash_file(p) for p in vocab})[:16],
        "chat_template": fingerprint(template)[:16] if template else "none",
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a published artifact, or None if there is none (or it cannot be read)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON so that a reader never sees half a file: write a sibling, then rename it over."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def publish(work_dir: Path, final_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Give ``work_dir`` its manifest and rename it to ``final_dir``, replacing an older output."""
    write_json(work_dir / MANIFEST, manifest)
    stale = None
    if final_dir.exists():
        stale = final_dir.with_name(f".{final_dir.name}.stale-{time.time_ns()}")
        os.replace(final_dir, stale)
    os.replace(work_dir, final_dir)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
