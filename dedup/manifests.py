"""Compatibility alias: `from dedup.manifests import DropDuplicates` keeps working (use `from dedup import DropDuplicates`)."""

from dedup.loader import DropDuplicates, MissingManifestWarning, load_removed_keys
from dedup.stages.manifests import KeepPolicy, decide_keep, write_manifests

__all__ = ["DropDuplicates", "KeepPolicy", "MissingManifestWarning", "decide_keep", "load_removed_keys", "write_manifests"]
