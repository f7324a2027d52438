"""Object storage for data (s3://, gs:// through pyarrow.fs): URIs, filesystems from the environment, objects."""

from raylm.storage.uri import SCHEMES, SUPPORTED, StorageUri, is_uri, parse_uri

__all__ = ["SCHEMES", "SUPPORTED", "StorageUri", "is_uri", "parse_uri"]
