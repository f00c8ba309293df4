"""The bundle: what ``build`` writes and every runner reads (see :mod:`.manifest` and :mod:`.install`)."""

from edgedeploy.bundle.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    WeightRecord,
    is_int,
    read_manifest,
    read_weights_index,
    safe_relative_name,
    sha256_file,
    unlisted_files,
    verify_bundle,
    write_manifest,
)

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Manifest", "WeightRecord", "is_int", "read_manifest",
           "read_weights_index", "safe_relative_name", "sha256_file", "unlisted_files", "verify_bundle",
           "write_manifest"]
