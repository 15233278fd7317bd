"""Weight files on object storage (``s3://``) and on the Hub (``hf://``), through fsspec.

``s3://`` goes through s3fs with the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``), so the same code reads and writes AWS
S3, MinIO or Ceph. ``hf://`` is huggingface_hub's ``HfFileSystem`` (read only here). Reads are ranged: a
file is opened without read-ahead cache, so loading one tensor fetches the footer and that tensor's
bytes only. Writes are published at the end: the file is written locally and uploaded to its key in one
step (a single PUT, or a multipart upload that S3 completes only when every part is in), so a failed or
interrupted upload leaves no object under the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llm_workbook.errors import StoreError

SCHEMES = ("s3://", "hf://")


def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


def _explain(url: str, exc: BaseException) -> StoreError:
    """One clear error for the usual ways object storage fails."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    codes = set(re.findall(r"\b(\d{3})\b", lowered))
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket does not exist" in lowered:
        why = "no such bucket"
    elif isinstance(exc, FileNotFoundError) or "nosuchkey" in lowered or "404" in codes:
        why = "no such object"
    elif isinstance(exc, PermissionError) or "403" in codes or any(
            k in lowered for k in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")):
        why = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the Hub token)"
    elif any(k in lowered for k in ("could not connect", "connection", "timed out", "endpoint", "name or service")):
        why = f"network error reaching the endpoint (AWS_ENDPOINT_URL={os.environ.get('AWS_ENDPOINT_URL', 'unset')})"
    else:
        why = "storage error"
    return StoreError(f"{url}: {why} ({text.splitlines()[0][:300]})")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for an ``s3://`` or ``hf://`` URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **({"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
                                             if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL") else {}))
    except ImportError as exc:
        raise StoreError(f"{url}: {exc}; s3:// needs s3fs (pip install -e '.[cluster]')") from None


def open_read(url: str):
    """A seekable binary file object over ``url`` that fetches exactly the ranges read."""
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb", cache_type="none", block_size=0) if url.startswith("s3://") else fs.open(path, "rb")
    except Exception as exc:  # fsspec / botocore raise many kinds
        raise _explain(url, exc) from None


def size(url: str) -> int:
    fs, path = filesystem(url)
    try:
        return int(fs.size(path))
    except Exception as exc:
        raise _explain(url, exc) from None


def identity(url: str) -> dict:
    """What changes when the object changes (size, ETag or modification time)."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except Exception as exc:
        raise _explain(url, exc) from None
    return {"source": url, "size": info.get("size"), "etag": info.get("ETag") or info.get("etag"),
            "mtime": str(info.get("LastModified") or info.get("mtime") or info.get("last_commit") or "")}


def upload(local: Path, url: str) -> None:
    """Publish ``local`` at ``url`` in one step (see the module docstring)."""
    fs, path = filesystem(url)
    try:
        fs.put_file(str(local), path)
    except Exception as exc:
        raise _explain(url, exc) from None


def check_writable(url: str) -> None:
    """Fail before the work when the bucket is missing or the credentials are refused."""
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except Exception as exc:
        raise _explain(url, exc) from None
