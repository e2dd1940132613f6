"""The champion pointer: compare-and-swapped, promoted only through the gate (or by hand)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from finetune.errors import PublishError, StorageError
from finetune.evaluation.gate import beats
from finetune.layout import CHAMPION_KEY, manifest_key
from finetune.publishing.publish import read_manifest, reread, run_step
from finetune.store import (
    NotFoundError,
    PreconditionFailed,
    Store,
    new_id,
)

log = logging.getLogger(__name__)

POINTER_FORMAT = "finetune-champion/1"


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    run_id: str
    reason: str
    previous: dict[str, Any] | None  # the champion pointer we compared against (None: there was none)
    pointer: dict[str, Any] | None  # the pointer now in the store

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_champion(store: Store) -> dict[str, Any] | None:
    got = _read_pointer(store)
    return got[0] if got else None


def _read_pointer(store: Store) -> tuple[dict[str, Any], str] | None:
    got = store.get_with_etag(CHAMPION_KEY)
    if got is None:
        return None
    try:
        pointer = json.loads(got[0])
    except ValueError:
        raise StorageError(f"{store.uri_for(CHAMPION_KEY)}: not valid JSON") from None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        raise StorageError(f"{store.uri_for(CHAMPION_KEY)}: not a {POINTER_FORMAT} pointer")
    return pointer, got[1]


Decide = Callable[[dict[str, Any] | None], tuple[bool, str]]


def _swap_champion(store: Store, run_id: str, fields: dict[str, Any], decide: Decide) -> PromotionDecision:
    """Compare-and-swap champion.json: decide against the pointer as read, write only if it is unchanged.

    Each lost race re-reads and decides again against the new champion, so a competing
    promotion is never overwritten unless we still beat it.
    """
    write_id = new_id()
    rounds = max(10, store.cfg.step_attempts)
    for _ in range(rounds):
        current = _read_pointer(store)
        previous, etag = current if current else (None, None)
        promote, reason = decide(previous)
        if not promote:
            log.info("run %s not promoted: %s", run_id, reason)
            return PromotionDecision(False, run_id, reason, previous, previous)
        pointer = {
            **fields,
            "format": POINTER_FORMAT,
            "run_id": run_id,
            "manifest_key": manifest_key(run_id),
            "reason": reason,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "write_id": write_id,
            "previous": {k: previous.get(k) for k in ("run_id", "metric", "score")} if previous else None,
        }
        body = json.dumps(pointer, indent=2, sort_keys=True, allow_nan=False).encode()

        def write(body: bytes = body, etag: str | None = etag) -> None:
            if etag is None:
                store.put_bytes(CHAMPION_KEY, body, if_none_match=True)
            else:
                store.put_bytes(CHAMPION_KEY, body, if_match=etag)

        try:
            run_step(store, f"write {store.uri_for(CHAMPION_KEY)}", write)
        except StorageError as error:
            # Ambiguous: our write may have committed with its response lost. Re-read to know.
            now = reread(lambda: read_champion(store), error)
            if now is not None and now.get("write_id") == write_id:
                log.info("champion pointer: our write had succeeded (%s)", error)
            elif isinstance(error, (PreconditionFailed, NotFoundError)):
                log.info("champion pointer changed while promoting %s; deciding again", run_id)
                continue
            else:
                raise
        log.info("promoted run %s to champion: %s", run_id, reason)
        return PromotionDecision(True, run_id, reason, previous, pointer)
    raise StorageError(f"{store.uri_for(CHAMPION_KEY)}: still contended after {rounds} rounds; try again")


def promote_if_better(
    store: Store,
    run_id: str,
    score: float | None,
    *,
    metric: str,
    higher_is_better: bool,
    margin: float = 0.0,
    reason: str = "",
    fresh_scores: Mapping[str, float] | None = None,
) -> PromotionDecision:
    """Make ``run_id`` the champion if its score beats the current champion's by ``margin`` (the gate's rule).

    The champion's score is the one recorded in its pointer, or ``fresh_scores[champion_run_id]``
    when the caller re-measured it on the same inputs. A champion scored on another metric is
    not comparable and is kept (promote manually). The run must be published.
    """
    if read_manifest(store, run_id) is None:
        raise PublishError(f"run {run_id} is not published in {store.uri}; publish before promoting")
    if score is None or not math.isfinite(score):
        return PromotionDecision(False, run_id, f"{metric} {score} is not finite", read_champion(store), None)
    fresh = dict(fresh_scores or {})

    def decide(champion: dict[str, Any] | None) -> tuple[bool, str]:
        suffix = f" ({reason})" if reason else ""
        if champion is None:
            return True, f"no champion yet; {metric} {score:.6g}{suffix}"
        if champion.get("run_id") == run_id:
            return False, f"run {run_id} is already the champion"
        theirs = fresh.get(champion["run_id"], champion.get("score"))
        if champion.get("metric") != metric or theirs is None:
            return False, (
                f"champion {champion['run_id']} is scored on {champion.get('metric')!r}, not {metric!r}; "
                "not comparable, promote manually"
            )
        won = beats(score, theirs, higher_is_better=higher_is_better, margin=margin)
        verdict = "beats" if won else "does not beat"
        return won, f"{metric} {score:.6g} {verdict} champion {champion['run_id']} ({theirs:.6g}) by {margin:g}{suffix}"

    fields = {"metric": metric, "score": score, "higher_is_better": higher_is_better}
    return _swap_champion(store, run_id, fields, decide)


def promote(store: Store, run_id: str, reason: str = "manual promotion") -> PromotionDecision:
    """Make a published run the champion regardless of scores, through the same compare-and-swap."""
    manifest = read_manifest(store, run_id)
    if manifest is None:
        raise PublishError(f"run {run_id} is not published in {store.uri}")
    evaluation = manifest.get("evaluation") or {}
    fields = {k: evaluation.get(k) for k in ("metric", "score", "higher_is_better")}
    return _swap_champion(store, run_id, fields, lambda champion: (True, reason))
