"""The export stage in the pipeline (exports published in the bundle, listed in the manifest) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from test_pipeline import invoke

from finetune.fsutil import file_digest


def test_flow_publishes_verified_exports_and_cli_exports_from_the_store(prefect_api, tmp_path):
    store = tmp_path / "store"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"work_dir: {tmp_path / '.finetune'}\n"
        "training:\n  iters: 4\n  steps_per_eval: 2\n  steps_per_checkpoint: 2\n"
        "evaluation:\n  primary_metric: val_loss\n  max_examples: 2\n"
        "export:\n  formats: [gguf, peft]\n  gguf_types: [f16, q8_0]\n"
        f"storage:\n  uri: {store}\n"
    )
    code, output = invoke("run", "-c", str(config), "--run-id", "exp-run")
    assert code == 0, output
    assert "export gguf: exports/gguf/" in output and "export peft: exports/peft/" in output

    manifest = json.loads((store / "runs" / "exp-run" / "manifest.json").read_text())
    exports = {e["format"]: e for e in manifest["exports"]}
    assert set(exports) == {"gguf", "peft"}
    assert exports["gguf"]["verification"]["gguf_f16_vs_fused"]["max_abs_logit_error"] < 0.05
    assert exports["peft"]["verification"]["peft_layers_vs_mlx"]["max_abs_error"] < 1e-5
    bundle = tmp_path / ".finetune" / "runs" / "exp-run" / "bundle"
    for name in (
        "exports/gguf/model-f16.gguf",
        "exports/gguf/model-q8_0.gguf",
        "exports/peft/adapter_model.safetensors",
    ):
        assert manifest["files"][name]["sha256"] == file_digest(bundle / name).sha256
        assert exports[name.split("/")[1]]["files"][name]["sha256"] == manifest["files"][name]["sha256"]
    card = (bundle / "README.md").read_text()
    assert "## Exports" in card and "gguf_q8_0_vs_fused" in card and "exports/peft/adapter_model.safetensors" in card
    assert card.index("## Metrics") < card.index("## Exports")  # appended to the card, not replacing it

    out = tmp_path / "fused"
    code, output = invoke("export", f"{store}/runs/exp-run", "--format", "fused", str(out), "--set", f"storage.uri={store}",
                          "--set", f"work_dir={tmp_path / '.finetune'}")  # fmt: skip
    assert code == 0, output
    assert "verified fused_vs_adapter" in output
    assert (
        json.loads((out / "export.json").read_text())["verification"]["fused_vs_adapter"]["max_abs_logit_error"] < 1e-3
    )
    assert Path(out / "model.safetensors").is_file()
