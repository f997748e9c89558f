"""The ``export`` step's artifact as the registry sees it: files and tags of a model version.

The registered model version carries every export in its files (``artifacts/exports/<format>/``, the
format's files with their ``manifest.json``, so a download can be verified) and names them in tags:

* ``pqflow.export_formats``: ``"compressed-tensors,gguf"`` (the recipe's order)
* ``pqflow.export_uri`` / ``pqflow.export_digest``: the export step's artifact
* per format ``pqflow.export.<format>.uri`` (a verified artifact of its own), ``.digest``, ``.bytes``
  and ``.path`` (where it lies in the version's files)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pqflow.artifacts import MANIFEST, Artifact, canonical_digest, join
from pqflow.errors import ArtifactError
from pqflow.export import FORMATS

INDEX_FILE = "exports.json"  # written by pqflow.stages.export
FILES_DIR = "exports"  # folder name inside the logged model's ``artifacts/``


def export_index(art: Artifact) -> dict[str, Any]:
    """Format -> entry of an export artifact's ``exports.json`` (in the recipe's order), each format
    checked to be a folder of it."""
    try:
        index = {e["format"]: e for e in json.loads((art.path / INDEX_FILE).read_text())["formats"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise ArtifactError(f"artifact {art.uri} is not an export (no valid {INDEX_FILE})") from None
    for fmt in index:
        # names become folder names and tag keys: only the registry's own
        if fmt not in FORMATS or not (art.path / fmt / MANIFEST).is_file():
            raise ArtifactError(f"artifact {art.uri}: export format {fmt!r} has no folder with a {MANIFEST}")
    return index


def model_key(model_digest: str, export: Artifact | None) -> str:
    """What identifies a registered version: the weights, and the exports attached to them (a new
    export of the same weights is a new version; without exports the key stays the weights' digest)."""
    if export is None:
        return model_digest
    return canonical_digest({"model": model_digest, "export": export.digest})


def stage_files(export: Artifact, dest: Path) -> Path:
    """``dest/exports/<format>/...``: the folder logged as the pyfunc's ``exports`` artifact (MLflow
    names it by its base name). Hard links where the file system allows, copies elsewhere."""
    out = dest / FILES_DIR
    for fmt in export_index(export):
        shutil.copytree(export.path / fmt, out / fmt, copy_function=_link_or_copy)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another device, or links not allowed: copy
        shutil.copy2(src, dst)


def version_tags(export: Artifact) -> dict[str, str]:
    index = export_index(export)
    tags = {"pqflow.export_formats": ",".join(index), "pqflow.export_uri": export.uri,
            "pqflow.export_digest": export.digest}
    for fmt, entry in index.items():
        tags.update({f"pqflow.export.{fmt}.uri": join(export.uri, fmt),
                     f"pqflow.export.{fmt}.digest": str(entry.get("digest", "")),
                     f"pqflow.export.{fmt}.bytes": str(entry.get("bytes", "")),
                     f"pqflow.export.{fmt}.path": f"artifacts/{FILES_DIR}/{fmt}"})
    return tags
