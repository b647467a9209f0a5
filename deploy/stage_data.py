"""Copy a node's read-only inputs from the bucket: every file under $SKELDIFF_DATA_URI (e.g. s3://skeldiff/data, any
URI pyarrow.fs.FileSystem.from_uri takes) into $SKELDIFF_DATA, keeping the layout.

Run before Ray starts on a node: the init container stage-data of deploy/kuberay/raycluster.yaml, the
setup_commands of deploy/ray-up.yaml. A file already there with the same size is kept, so a restarted pod or a
second run copies only what changed in size or is new. With SKELDIFF_DATA_URI empty or unset, or nothing under
it, nothing is copied and the exit status is 0 (the synthetic splits need no data). Credentials and the endpoint
come from the standard variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), as for Ray.
Usage: python deploy/stage_data.py [URI DEST]   (default: $SKELDIFF_DATA_URI $SKELDIFF_DATA)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyarrow import fs


def stage(uri: str, dest: Path) -> tuple[int, int]:
    """(files copied, files kept) from URI into DEST."""
    source, root = fs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    found = source.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    local = fs.LocalFileSystem()
    dest = dest.resolve()
    copied = kept = 0
    for info in sorted((i for i in found if i.type == fs.FileType.File), key=lambda i: i.path):
        target = (dest / info.path[len(root):].lstrip("/")).resolve()
        if not target.is_relative_to(dest):
            raise SystemExit(f"stage-data: {info.path} would land outside {dest}")
        if target.is_file() and target.stat().st_size == info.size:
            kept += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        fs.copy_files(info.path, str(partial), source_filesystem=source, destination_filesystem=local)
        partial.replace(target)   # a reader never sees half a file
        copied += 1
    return copied, kept


def main(argv: list[str]) -> int:
    uri, dest = argv if len(argv) == 2 else (os.environ.get("SKELDIFF_DATA_URI", ""), os.environ.get("SKELDIFF_DATA"))
    if not uri:
        print("stage-data: SKELDIFF_DATA_URI is empty, nothing to copy")
        return 0
    if not dest:
        print("stage-data: SKELDIFF_DATA is not set (where the files go)", file=sys.stderr)
        return 2
    copied, kept = stage(uri, Path(dest))
    print(f"stage-data: {copied} files copied, {kept} kept from {uri} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
