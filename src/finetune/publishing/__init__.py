"""Publishing: verified, write-once bundles in the store, the champion pointer, listing, gc and fetching."""

from finetune.errors import PublishError
from finetune.layout import check_run_id, manifest_key, run_key
from finetune.publishing.catalog import GcReport, RunSummary, gc, list_runs
from finetune.publishing.champion import PromotionDecision, promote, promote_if_better, read_champion
from finetune.publishing.fetch import fetch_bundle, pull_bundle, split_ref
from finetune.publishing.publish import (
    ALLOWED_SUFFIXES,
    AlreadyPublished,
    BundleError,
    PublishedRun,
    bundle_files,
    find_published,
    publish_run,
    read_manifest,
)

__all__ = [
    "ALLOWED_SUFFIXES",
    "AlreadyPublished",
    "BundleError",
    "GcReport",
    "PromotionDecision",
    "PublishError",
    "PublishedRun",
    "RunSummary",
    "bundle_files",
    "check_run_id",
    "fetch_bundle",
    "find_published",
    "gc",
    "list_runs",
    "manifest_key",
    "promote",
    "promote_if_better",
    "publish_run",
    "pull_bundle",
    "read_champion",
    "read_manifest",
    "run_key",
    "split_ref",
]
