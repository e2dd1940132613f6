"""The publish tasks under a real Prefect API: marker credentials reach S3 but no parameter, log or artifact."""

from __future__ import annotations

import json
import uuid

import pytest
from s3faults import make_bundle, moto_server, raw_client  # noqa: F401  (moto_server is a fixture)

from finetune.config import StorageConfig
from finetune.pipeline.results import Champion, Promotion, Scorecard

KEY_ID, SECRET, TOKEN = "AKIAPREFECTMARKER001", "PREFECT/MARKER/secret+0001", "PREFECTMARKERTOKEN0001"

pytestmark = pytest.mark.slow


def test_publish_tasks_keep_secrets_out_of_prefect(prefect_api, moto_server, tmp_path):
    from prefect import flow
    from prefect.artifacts import create_link_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler

    from tasks.publish import champion_bundle, promote_candidate, publish_bundle

    endpoint = f"http://{moto_server[0]}:{moto_server[1]}"
    bucket = f"ft-{uuid.uuid4().hex[:12]}"
    raw_client(endpoint, key="setup").create_bucket(Bucket=bucket)
    storage = StorageConfig(
        uri=f"s3://{bucket}/team",
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        session_token=TOKEN,
    )
    bundle = make_bundle(tmp_path / "bundle")
    scorecard = Scorecard(True, "no champion yet", "val_loss", higher_is_better=False, score=1.25)

    @flow
    def publish_stage(storage: StorageConfig, bundle_dir: str, run_id: str) -> dict:
        published = publish_bundle(storage, run_id, bundle_dir, {"evaluation": {"metric": "val_loss", "score": 1.25}})
        promotion = promote_candidate(storage, run_id, scorecard, 0.0, None)
        champion = champion_bundle(storage, str(tmp_path / "work"))
        create_link_artifact(link=published.uri, link_text=f"bundle of run {run_id}", key="published-bundle")
        return {
            "uri": published.uri,
            "promotion": promotion,
            "champion": champion,
            "flow_run_id": str(get_run_context().flow_run.id),
        }

    result = publish_stage(storage, str(bundle), "prefect-run")
    assert result["promotion"] == Promotion(True, "no champion yet; val_loss 1.25")
    assert isinstance(result["champion"], Champion) and result["champion"].run_id == "prefect-run"
    assert (result["champion"].path / "adapters.safetensors").is_file()
    assert result["uri"] == f"s3://{bucket}/team/runs/prefect-run"
    APILogHandler().flush()

    async def collect() -> list[str]:
        async with get_client() as client:
            run_id = uuid.UUID(result["flow_run_id"])
            flow_run = await client.read_flow_run(run_id)
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            artifacts = await client.read_artifacts()
        texts = [json.dumps(flow_run.parameters, default=str), flow_run.model_dump_json()]
        texts += [t.model_dump_json() for t in tasks] + [log.message for log in logs]
        texts += [a.model_dump_json() for a in artifacts]
        assert any("published 3 files" in log.message for log in logs)  # the logs were really read
        assert any(a.key == "published-bundle" for a in artifacts)
        return texts

    import asyncio

    texts = asyncio.run(collect())
    assert "**********" in texts[0]  # the parameter is there, masked
    for text in texts:
        for marker in (KEY_ID, SECRET, TOKEN, "MARKER"):
            assert marker not in text, f"{marker} leaked: {text[:300]}"
