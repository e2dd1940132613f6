"""Prefect task for the optional export stage: fused / GGUF / PEFT files, verified, inside the bundle."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from finetune.config import Settings
from finetune.evaluation.report import add_exports_to_card
from finetune.export import BundleExport, export_into_bundle
from finetune.layout import MODEL_CARD_FILE


@task(name="export-bundle", cache_policy=NO_CACHE, result_serializer="json")
def export_formats(bundle_dir: str, settings: Settings) -> list[BundleExport]:
    """Write ``settings.export.formats`` into ``<bundle>/exports/`` and list them in the model card."""
    logger = get_run_logger()
    exports = export_into_bundle(bundle_dir, settings)
    for export in exports:
        checks = ", ".join(
            f"{name} {figures.get('max_abs_logit_error', figures.get('max_abs_error')):.3g}"
            for name, figures in export.verification.items()
        )
        logger.info("exported %s in %.1f s (max |Δ|: %s)", export.format, export.seconds, checks)
    add_exports_to_card(Path(bundle_dir) / MODEL_CARD_FILE, exports)
    return exports
