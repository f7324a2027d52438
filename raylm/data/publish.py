"""`raylm prepare` into an s3:// or gs:// data.out_dir: upload a folder prepared locally, manifest last.

raylm.data.prepare prepares the folder and calls this module to check and upload it.

1. Probe the bucket (a missing bucket or a silent endpoint fails before any tokenizing).
2. When the prefix's manifest records these inputs and every object it names is there with its size (and
   tokenizer.json has its sha256), stop: a rerun on unchanged input is a no-op, as for a local folder.
3. Otherwise run the ordinary local prepare into this node's cache folder for the prefix (raylm.data.cache), so
   a stream on this node later finds the shards already in place.
4. Upload the shards the prefix lacks (an object with the same name and size is one an earlier upload of the
   same inputs completed: shard names carry the input fingerprint), then the tokenizer under a name of its own
   sha256 (`tokenizer-<sha>.json`), then manifest.json, then tokenizer.json. The manifest is what makes a prefix
   a prepared folder, so a reader sees the old manifest with its old shards and tokenizer or the new one with
   every new object in place (readers take the tokenizer by the manifest's sha256 name); an interrupted upload
   leaves the previous prepared prefix valid.
5. Remove the shard and tokenizer-<sha> objects the new manifest no longer names (only names of raylm's own
   patterns, only under the prefix the user named).
Two prepares of one prefix from different machines are not kept apart (there is no lock on object storage).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from raylm.data.shards import SHARD_NAME, check_shard_size, parse_manifest, read_data_manifest
from raylm.data.tokenizer import TOKENIZER_OBJECT, tokenizer_object
from raylm.errors import DataError
from raylm.log import get_logger
from raylm.storage.file_names import MANIFEST_FILE, TOKENIZER_FILE
from raylm.storage.objects import delete_object, object_sizes, read_bytes, upload_file
from raylm.storage.uri import StorageUri


def remote_current(uri: StorageUri, input_sha: str) -> dict | None:
    """The prefix's manifest when it was built from these inputs and every object it names is in place."""
    data = read_bytes(uri.join(MANIFEST_FILE))
    if data is None:
        return None
    try:
        manifest = parse_manifest(data, str(uri.join(MANIFEST_FILE)), str(uri))
    except DataError:
        return None  # a manifest we cannot use is rebuilt
    if manifest.get("input_sha256") != input_sha:
        return None
    sizes = object_sizes(uri)
    if any(sizes.get(e["file"]) != e["bytes"] for e in manifest["shards"]):
        return None
    sha = manifest["tokenizer_sha256"]
    if tokenizer_object(sha) not in sizes or TOKENIZER_FILE not in sizes:
        return None
    tokenizer = read_bytes(uri.join(TOKENIZER_FILE))
    return manifest if tokenizer is not None and hashlib.sha256(tokenizer).hexdigest() == sha else None


def upload_prepared(folder: Path, uri: StorageUri) -> int:
    """Upload a prepared local folder to the prefix, manifest.json last; the number of shards uploaded."""
    manifest = read_data_manifest(folder)
    sizes = object_sizes(uri)
    names = {e["file"] for e in manifest["shards"]}
    missing = [e for e in manifest["shards"] if sizes.get(e["file"]) != e["bytes"]]
    for index, entry in enumerate(missing, 1):
        upload_file(check_shard_size(folder, entry), uri.join(entry["file"]))
        get_logger().info(
            "prepare: uploaded %s (%d of %d shards)", uri.join(entry["file"]), index, len(missing)
        )
    tokenizer = tokenizer_object(manifest["tokenizer_sha256"])
    upload_file(folder / TOKENIZER_FILE, uri.join(tokenizer))
    upload_file(folder / MANIFEST_FILE, uri.join(MANIFEST_FILE))  # the commit point
    upload_file(folder / TOKENIZER_FILE, uri.join(TOKENIZER_FILE))  # the plain name, as in a local folder
    for name in sorted(sizes):
        if (SHARD_NAME.match(name) and name not in names) or (
            TOKENIZER_OBJECT.match(name) and name != tokenizer
        ):
            delete_object(uri.join(name))
    get_logger().info("prepare: %s holds %d shards, tokenizer.json and manifest.json", uri, len(names))
    return len(missing)
