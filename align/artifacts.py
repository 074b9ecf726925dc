"""Stage outputs on disk: fingerprints, manifests, atomic publishing and verification.

A stage writes into a work folder; only when it succeeds is the folder given its manifest and renamed
to ``<run_dir>/<stage>``. So a published folder is complete when it appears, and a folder that is not
there (or whose manifest fingerprint differs) means the stage must run. The manifest also lists every
file of the output with its size, modification time and hash, so that an output damaged afterwards (a
file deleted, truncated, edited, or one added) is found by :func:`check_output` and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "OutputCheck",
    "check_output",
    "describe_files",
    "fingerprint",
    "hash_file",
    "publish",
    "read_manifest",
    "tokenizer_identity",
]

#: The manifest's file name inside a published artifact folder.
MANIFEST = "align-manifest.json"
#: Bumped when the manifest's layout changes incompatibly. 2: ``files`` lists every file of the output
#: (size, mtime_ns, sha256); an output published with an older format cannot be verified and is rebuilt.
MANIFEST_FORMAT = 2

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


def fingerprint(payload: Any) -> str:
    """A stable hash of JSON-able data (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: Path) -> str:
    """The sha256 of a file's content, read in 1 MiB chunks."""
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


def publish(work_dir: Path, final_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Give ``work_dir`` its manifest and rename it to ``final_dir``, replacing an older output.

    The manifest written (and returned) is ``manifest`` with ``files``: every file of the output with its
    size, modification time and hash (:func:`describe_files`), which :func:`check_output` checks later.
    """
    written = {**manifest, "files": describe_files(work_dir)}
    write_json(work_dir / MANIFEST, written)
    stale = None
    if final_dir.exists():
        stale = final_dir.with_name(f".{final_dir.name}.stale-{time.time_ns()}")
        os.replace(final_dir, stale)
    try:
        os.replace(work_dir, final_dir)
    except BaseException:
        if stale is not None:  # put the earlier output back: a failed publish must not lose it
            os.replace(stale, final_dir)
        raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    return written


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` but the manifest: relative path → ``size``, ``mtime_ns``, ``sha256``.

    Renaming the folder into place keeps the files' modification times, so the times recorded here are
    the ones :func:`check_output` later compares with.
    """
    files = {}
    for relative, path in _files(folder):
        stat = path.stat()
        files[relative] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": hash_file(path)}
    return files


@dataclass
class OutputCheck:
    """What :func:`check_output` found."""

    #: What is wrong with the files, in words ("model.safetensors is missing"); empty when none is.
    problems: list[str] = field(default_factory=list)
    #: Why the output cannot be checked at all (a manifest without a file list), or None.
    unverifiable: str | None = None
    #: Files whose modification time changed but whose content did not: relative path → mtime_ns now.
    touched: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and self.unverifiable is None

    def describe(self) -> str:
        """``is damaged: a is missing; b was changed``, or ``cannot be verified: why``; empty when ok."""
        if self.unverifiable is not None:
            return f"cannot be verified: {self.unverifiable}"
        return f"is damaged: {'; '.join(self.problems)}" if self.problems else ""


def check_output(folder: Path, manifest: Mapping[str, Any]) -> OutputCheck:
    """Compare a published output with the file list of its manifest.

    Fast on purpose, because it runs on every cache hit and outputs can be many GB: a file whose size
    and modification time (to the nanosecond) match the manifest is taken as unchanged, so an untouched
    output costs one ``stat`` per file. Only a file whose size matches but whose time differs (copied,
    touched, or edited in place) is hashed again; a different size is damage without reading a byte.
    Hidden files that were not published (``.DS_Store``, ``.ipynb_checkpoints``) are ignored, because
    neither transformers nor peft loads them; any other extra file is damage, since an extra weights or
    config file can change what ``from_pretrained`` loads.
    """
    listed = manifest.get("files")
    if not isinstance(listed, Mapping):
        return OutputCheck(
            unverifiable=f"it was published by an older align, whose manifest (format {manifest.get('format', 1)}) "
            "lists no files to check"
        )
    found = dict(_files(folder))
    check = OutputCheck()
    for relative, recorded in listed.items():
        path = found.pop(relative, None)
        if path is None:
            check.problems.append(f"{relative} is missing")
            continue
        stat = path.stat()
        if stat.st_size != recorded.get("size"):
            check.problems.append(
                f"{relative} has {stat.st_size} bytes, not the {recorded.get('size')} it was published with"
            )
        elif stat.st_mtime_ns != recorded.get("mtime_ns"):
            if hash_file(path) != recorded.get("sha256"):
                check.problems.append(f"{relative} was changed after it was published")
            else:
                check.touched[relative] = stat.st_mtime_ns
    for relative in found:
        if not any(part.startswith(".") for part in Path(relative).parts):
            check.problems.append(f"{relative} is not part of the published output")
    return check


def _files(folder: Path) -> list[tuple[str, Path]]:
    """(path relative to ``folder`` in POSIX form, path) of every regular file in it, the manifest aside."""
    found = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != MANIFEST and path.is_file():
                found.append((relative, path))
    return sorted(found)
