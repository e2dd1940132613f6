"""Data-parallel training through mlx.launch on 127.0.0.1: two ranks reproduce one rank, a killed rank stops the
attempt on every rank, and the retry resumes to the same adapter as an uninterrupted two-rank run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from finetune.config import load_settings
from finetune.errors import ConfigError, TrainingChildError
from finetune.layout import ADAPTER_DIR, ADAPTER_FILE, TRAIN_EVENTS_FILE
from finetune.train import checkpoints
from finetune.train.child import run_training_child
from finetune.train.distributed import disagreement
from finetune.train.launch import free_ports, launcher, read_hostfile

ITERS = 8
# batch_size 5 on 2 ranks: shards of 3 and 2 rows; gradient accumulation crosses an epoch boundary (12 batches).
OVERRIDES = [
    "training.packing=false",  # several ranks train bucketed (packs are not split by rank yet): the same for 1 rank
    f"training.iters={ITERS}",
    "training.batch_size=5",
    "training.grad_accumulation_steps=2",
    "training.warmup_steps=2",
    "training.steps_per_report=1",
    "training.steps_per_eval=4",
    "training.steps_per_checkpoint=2",
    "training.final_adapter=last",
    "training.distributed_timeout_seconds=60",
    "lora.rank=4",
]
# The bound the issue asks for, on every step's training loss and every validation loss.
LOSS_RTOL = 1e-5
# Adapter tensors after 8 AdamW steps, relative to the tensor's largest magnitude.
ADAPTER_RTOL = 1e-4


@pytest.fixture(scope="module")
def data_path(medium_tokenized: Path) -> Path:
    return medium_tokenized


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hosts") / "hosts.json"
    path.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    return path


def train(model: Path, data: Path, run_dir: Path, hosts: Path | None, on_event=None):
    extra = [f"training.hosts={hosts}"] if hosts else []
    settings = load_settings(None, [*OVERRIDES, *extra])
    return run_training_child(
        settings, str(model), data, run_dir, lambda _: None, on_event=on_event, progress_interval=0, timeout=300
    )


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    events = [json.loads(line) for line in (run_dir / TRAIN_EVENTS_FILE).read_text().splitlines()]
    return {
        (e["event"], e["step"]): e["train_loss"] if e["event"] == "train" else e["val_loss"]
        for e in events
        if e["event"] in ("train", "eval")
    }


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / ADAPTER_DIR / ADAPTER_FILE)).items()}


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, data_path, hostfile, tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("two-ranks")
    seen: list[dict] = []
    result = train(tiny_model_dir, data_path, run_dir, hostfile, on_event=seen.append)
    assert result.steps == ITERS and result.resumed_from is None
    return run_dir, seen


def test_two_ranks_reproduce_one_rank(tiny_model_dir, data_path, two_ranks, tmp_path):
    run2, seen = two_ranks
    ranks = [e for e in seen if e["event"] == "rank"]
    assert sorted(e["rank"] for e in ranks) == [0, 1] and len({e["pid"] for e in ranks}) == 2
    assert next(e for e in seen if e["event"] == "start")["ranks"] == 2

    train(tiny_model_dir, data_path, tmp_path / "one", None)
    one, two = losses(tmp_path / "one"), losses(run2)
    assert one.keys() == two.keys() and len([k for k in one if k[0] == "train"]) == ITERS
    rel = {k: abs(two[k] - one[k]) / abs(one[k]) for k in one}
    print(f"max relative loss difference, 2 ranks vs 1: {max(rel.values()):.2e} (at {max(rel, key=rel.get)})")
    assert max(rel.values()) <= LOSS_RTOL
    # The runs must not be trivially identical (rank 1 idle, or the same process): reduction order differs.
    a1, a2 = adapter(tmp_path / "one"), adapter(run2)
    assert a1.keys() == a2.keys()
    worst = max(float(np.max(np.abs(a2[k] - a1[k])) / np.max(np.abs(a1[k]))) for k in a1)
    print(f"max adapter tensor difference relative to its largest entry: {worst:.2e}")
    assert worst <= ADAPTER_RTOL
    assert not (run2 / checkpoints.step_dir_name(1)).exists()


def test_killed_rank_stops_all_and_retry_resumes_exactly(tiny_model_dir, data_path, hostfile, two_ranks, tmp_path):
    run_dir = tmp_path / "killed"
    pids: dict[int, int] = {}

    def kill_rank_1(event: dict) -> None:
        if event["event"] == "rank":
            pids[event["rank"]] = event["pid"]
        if event["event"] == "train" and event["step"] == 3:
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(TrainingChildError, match=r"rank 1 was killed by SIGKILL.*; every rank was stopped"):
        train(tiny_model_dir, data_path, run_dir, hostfile, on_event=kill_rank_1)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids.values()), "a rank outlived the failed attempt"
    last = checkpoints.latest_valid(run_dir / "checkpoints")
    assert last is not None and 2 <= last.step < ITERS

    result = train(tiny_model_dir, data_path, run_dir, hostfile)
    assert result.resumed_from == last.step and result.steps == ITERS
    reference = two_ranks[0]
    assert losses(run_dir) == losses(reference)
    ours, theirs = adapter(run_dir), adapter(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, just not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def _probe(mode: str, *args: str) -> subprocess.CompletedProcess:
    probe = Path(__file__).with_name("dist_probe.py")
    command = [launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "-p", str(free_ports(2))]
    return subprocess.run(
        [*command, "--", sys.executable, str(probe), mode, *args], capture_output=True, text=True, timeout=120
    )


def test_ranks_agree_broadcast_exactly_and_sum_gradients():
    out = _probe("agree")
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"world": 2, "w": ["-0.0", "1.5", "3.25"], "step": 7, "grad": [3.0] * 3}


def test_a_rank_without_the_data_file_gets_rank_0s_copy(tmp_path):
    payload = os.urandom(2500)
    (tmp_path / "data.bin").write_bytes(payload)
    out = _probe("file", str(tmp_path))
    seen = {e["rank"]: e for e in map(json.loads, (x for x in out.stdout.splitlines() if x.startswith("{")))}
    assert seen[0]["first"] == seen[0]["again"] == str(tmp_path / "data.bin")
    copy = Path(seen[1]["first"])
    assert copy.parent == tmp_path / "cache-1" and copy.read_bytes() == payload
    assert seen[1]["again"] == str(copy)  # the retry finds its cached copy


def test_fingerprint_mismatch_names_the_rank_and_what_differs():
    out = _probe("mismatch")
    errors = [json.loads(line)["error"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(errors) == 2  # every rank stops with the same message, none waits for another
    assert errors[0] == errors[1]
    assert "rank 1 (" in errors[0] and "different data (other vs rank 0's d)" in errors[0]
    assert "different model" not in errors[0] and "different config" not in errors[0]


def test_a_rank_that_never_joins_is_given_up_on():
    out = _probe("hang")
    assert "rank 0: agreement check waited more than 3 s for the other ranks" in out.stderr
    assert "Node with rank 0 exited with code 75" in out.stderr


def test_disagreement_lists_every_rank_and_part():
    rows = [
        {"host": "a", "digests": {"data": "1", "model": "m"}},
        {"host": "b", "digests": {"data": "1", "model": "m"}},
        {"host": "c", "digests": {"data": "2", "model": "x"}},
    ]
    assert disagreement(rows[:2]) is None
    message = disagreement(rows)
    assert "rank 2 (c) has a different data" in message and "rank 2 (c) has a different model" in message
    assert "rank 1" not in message


def test_hostfile_needs_ip_addresses_for_ring(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": [{"ssh": "mac1.local", "ips": ["192.168.1.10"]}, {"ssh": "mac2.local"}]}))
    with pytest.raises(ConfigError, match=r"host 1 \(mac2.local\) has no \"ips\".*IP addresses, not host names"):
        read_hostfile(path, "ring")
    path.write_text(json.dumps([{"ssh": "mac1", "ips": ["mac1.local"]}]))
    with pytest.raises(ConfigError, match=r"host 0 \(mac1\): \"ips\" must be a list of IP addresses"):
        read_hostfile(path, "ring")
    with pytest.raises(ConfigError, match="no such file"):
        read_hostfile(tmp_path / "missing.json", "ring")
    assert read_hostfile(_write(path, [{"ssh": "127.0.0.1"}]), "mpi").local
    remote_first = [{"ssh": "mac2.local", "ips": ["192.0.2.7"]}, {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]
    with pytest.raises(ConfigError, match=r"host 0 \(mac2.local\) must be this machine"):
        read_hostfile(_write(path, remote_first), "ring")
    # Ethernet: this Mac by its LAN name or address, the other by IP.
    lan = [{"ssh": "mac1.local", "ips": ["127.0.0.1"]}, {"ssh": "mac2.local", "ips": ["192.0.2.7"]}]
    assert not read_hostfile(_write(path, lan), "ring").local


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_flow_trains_on_two_local_ranks_and_publishes_one_bundle(prefect_api, hostfile, tmp_path):
    from finetune.config import EvaluationConfig, StorageConfig, TrainingConfig
    from finetune.publishing import list_runs
    from finetune.store import open_store
    from flows.finetune import finetune_pipeline

    storage = StorageConfig(uri=str(tmp_path / "store"))
    summary = finetune_pipeline(
        training=TrainingConfig(iters=6, batch_size=4, steps_per_eval=6, steps_per_checkpoint=6, hosts=str(hostfile)),
        evaluation=EvaluationConfig(max_examples=4, primary_metric="val_loss"),
        storage=storage,
        work_dir=str(tmp_path / "work"),
        run_id="two-ranks",
    )
    assert summary["training"]["ranks"] == 2 and summary["training"]["steps"] == 6
    [run] = list_runs(open_store(storage))
    assert run.run_id == "two-ranks" and run.published
    published = tmp_path / "store" / "runs" / "two-ranks" / "metrics.json"  # the run's directory is the bundle
    assert json.loads(published.read_text())["training"]["ranks"] == 2
