"""The job queue: one claim per run under concurrency, leases, fencing, gap-free events; on
SQLite and on PostgreSQL (where claims use SKIP LOCKED)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from loraforge.services.trainer.hardware import Capabilities, LiveWorker, Requirements
from loraforge.services.trainer.jobs import JobQueue, JobReporter
from loraforge.services.trainer.runs import status_message
from loraforge.services.trainer.store import EventKind, State, TrainerStore, VersionRow
from loraforge.services.trainer.workers import Workers
from tests.support import Databases


@pytest.fixture
def url(databases: Databases, request: pytest.FixtureRequest) -> str:
    """A fresh trainer database for the test, on SQLite and on PostgreSQL."""
    return databases.url(request.node.name)


def _store(url: str) -> TrainerStore:
    return TrainerStore(url)


def _queue_runs(
    store: TrainerStore, count: int, needs: Sequence[Requirements | None] = ()
) -> list[str]:
    """Queues `count` runs; the i-th needs `needs[i]` (None or missing: stored as before
    requirements were, NULL)."""
    store.create_model("a", "m", "", "modelTypes/text-to-text")
    names = []
    for i in range(count):
        required = needs[i] if i < len(needs) else None
        row = VersionRow(
            name=f"apps/a/models/m/versions/v{i}",
            model="apps/a/models/m",
            template="templates/HF_GPTNeo_125m_lora",
            dataset_version="apps/a/datasets/d/versions/1",
            param_overrides={},
            params={"trainer_config": {}},
            failure_reason="",
            progress={},
            metrics={},
        )
        if required is not None:
            row.needs_cuda = required.cuda
            row.needs_gptq = required.gptq
            row.needs_gpu_memory_gib = required.gpu_memory_gib
        names.append(store.create_version(row).name)
    return names


def test_concurrent_workers_claim_each_run_exactly_once(url: str) -> None:
    names = _queue_runs(_store(url), 24)
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(worker_id: str) -> None:
        queue = JobQueue(_store(url))  # own engine and connections, like a separate process
        while (job := queue.claim(worker_id, lease_seconds=60)) is not None:
            with lock:
                claims.append((job.name, worker_id))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(name for name, _ in claims) == sorted(names)
    store = _store(url)
    for name in names:
        row = store.get_version(name)
        assert row.state == State.TRAINING and row.attempts == 1
        states = [
            e.payload["state"] for e in store.events_after(name, 0) if e.kind == EventKind.STATE
        ]
        assert states == ["QUEUED", "TRAINING"]


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_expired_lease_requeues_for_resume_then_fails_after_max_attempts(url: str) -> None:
    store = _store(url)
    (name,) = _queue_runs(store, 1)
    clock = FakeClock()
    queue = JobQueue(store, clock)
    job = queue.claim("w1", lease_seconds=60)
    assert job is not None and job.attempt == 1
    reporter = JobReporter(store, name, "w1", clock)
    assert reporter.checkpoint(10, "trainer/x/checkpoints/checkpoint-10", "trainer/x/checkpoints")
    clock.advance(59)
    assert queue.reap_expired(max_attempts=2) == []  # lease still valid
    assert reporter.heartbeat(60)  # renewed: valid for another 60 s from now
    clock.advance(59)
    assert queue.reap_expired(max_attempts=2) == []
    clock.advance(2)
    assert queue.reap_expired(max_attempts=2) == [name]
    assert store.get_version(name).state == State.QUEUED
    again = queue.claim("w2", lease_seconds=60)
    assert again is not None and again.attempt == 2 and again.checkpoint_step == 10
    # The first worker comes back from the dead: every write it tries is refused.
    zombie = JobReporter(store, name, "w1", clock)
    assert not zombie.heartbeat(60) and not zombie.progress({"step": 11}) and not zombie.log("hi")
    clock.advance(61)
    assert queue.reap_expired(max_attempts=2) == [name]
    row = store.get_version(name)
    assert (
        row.state == State.FAILED and row.status_code == 21106 and "giving up" in row.failure_reason
    )
    events = store.events_after(name, 0)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    messages = [e.payload.get("message", "") for e in events if e.kind == EventKind.STATE]
    assert "resume from checkpoint step 10" in messages[2]


def test_cancel_fences_the_worker_and_ends_the_history(url: str) -> None:
    store = _store(url)
    queued, running = _queue_runs(store, 2)
    queue = JobQueue(store)
    job = queue.claim("w1", lease_seconds=60)
    assert job is not None and job.name == queued  # oldest first
    reporter = JobReporter(store, queued, "w1")
    assert reporter.heartbeat(60) and reporter.progress({"step": 1, "total_steps": 5})
    assert store.cancel_version(queued).state == State.CANCELLED
    assert not reporter.heartbeat(60)
    assert (
        not reporter.progress({"step": 2})
        and not reporter.uploading()
        and not reporter.failed("late")
    )
    events = store.events_after(queued, 0)
    assert events[-1].is_final_state and events[-1].payload["state"] == "CANCELLED"
    assert store.get_version(queued).progress == {"step": 1, "total_steps": 5}
    # A queued run is cancelled at once and is never claimed.
    assert store.cancel_version(running).state == State.CANCELLED
    assert queue.claim("w1", lease_seconds=60) is None
    # Cancelling a finished run changes nothing.
    assert store.cancel_version(running).state == State.CANCELLED
    assert len(store.events_after(running, 0)) == 2


GPTQ_8B = Requirements(cuda=True, gptq=True, gpu_memory_gib=10)
BIG_GPU = Requirements(cuda=True, gpu_memory_gib=16)
CPU_OK = Requirements()


def test_a_worker_claims_only_the_runs_its_advertised_hardware_can_train(url: str) -> None:
    store = _store(url)
    gptq, before, cpu, big = _queue_runs(store, 4, [GPTQ_8B, None, CPU_OK, BIG_GPU])
    queue, workers = JobQueue(store), Workers(store)
    workers.advertise("cpu", Capabilities(), ttl_seconds=60)
    workers.advertise("small-gpu", Capabilities(cuda=True, gpu_memory_gib=8), ttl_seconds=60)
    workers.advertise("gpu", Capabilities(cuda=True, gpu_memory_gib=24, gptq=True), ttl_seconds=60)
    # The CPU worker passes over the older GPU runs; runs stored before requirements were
    # (NULL) are anyone's.
    claimed = [job.name for job in iter(lambda: queue.claim("cpu", 60), None)]
    assert claimed == [before, cpu]
    # 8 GiB is less than either GPU run needs, and it has no GPTQModel.
    assert queue.claim("small-gpu", 60) is None
    assert store.get_version(gptq).state == store.get_version(big).state == State.QUEUED
    first, second = queue.claim("gpu", 60), queue.claim("gpu", 60)
    assert first is not None and second is not None
    assert (first.name, second.name) == (gptq, big)
    assert queue.claim("gpu", 60) is None


def test_workers_are_live_until_their_ttl_passes_and_gone_once_forgotten(url: str) -> None:
    store = _store(url)
    clock = FakeClock()
    workers = Workers(store, clock)
    workers.advertise("w1", Capabilities(cuda=True, gpu_memory_gib=80), ttl_seconds=10)
    workers.advertise("w2", Capabilities(), ttl_seconds=30)
    assert [w.worker_id for w in workers.live()] == ["w1", "w2"]
    assert workers.live()[0].capabilities == Capabilities(cuda=True, gpu_memory_gib=80)
    clock.advance(11)
    assert [w.worker_id for w in workers.live()] == ["w2"]
    workers.advertise("w1", Capabilities(cuda=True, gpu_memory_gib=80), ttl_seconds=10)
    assert [w.worker_id for w in workers.live()] == ["w1", "w2"]  # renewed
    workers.forget("w2")
    assert [w.worker_id for w in workers.live()] == ["w1"]
    clock.advance(11)
    assert workers.forget_expired(clock()) == 1 and workers.live() == []


def test_a_wait_reason_is_logged_once_per_change_and_cleared_by_the_claim(url: str) -> None:
    store = _store(url)
    (name,) = _queue_runs(store, 1, [GPTQ_8B])
    reason = "waiting for a worker with a CUDA GPU; the 1 live worker has neither"
    assert store.note_waiting(name, reason)
    assert not store.note_waiting(name, reason)  # the same words again: nothing new
    assert store.note_waiting(name, reason + " (2)")
    logs = [e.payload for e in store.events_after(name, 0) if e.kind == EventKind.LOG]
    assert logs == [
        {"level": "WARNING", "message": reason},
        {"level": "WARNING", "message": reason + " (2)"},
    ]
    assert store.queued_waits() == [(name, GPTQ_8B, reason + " (2)")]
    Workers(store).advertise("gpu", Capabilities(True, 24, True), ttl_seconds=60)
    assert JobQueue(store).claim("gpu", 60) is not None
    assert store.get_version(name).wait_reason is None and store.queued_waits() == []
    assert not store.note_waiting(name, reason)  # not queued any more: nothing is written


def test_a_queued_run_that_a_live_worker_can_train_waits_only_for_it_to_be_free() -> None:
    gpu = LiveWorker("gpu", Capabilities(cuda=True, gpu_memory_gib=80, gptq=True))
    cpu = LiveWorker("cpu", Capabilities())
    assert status_message(GPTQ_8B, [cpu, gpu]) == (
        "waiting for a free worker (1 live worker can train it)"
    )
    assert status_message(CPU_OK, [cpu, gpu]) == (
        "waiting for a free worker (2 live workers can train it)"
    )
    assert status_message(GPTQ_8B, [cpu]) == (
        "waiting for a worker with a CUDA GPU of at least 10 GiB and GPTQModel; "
        "the 1 live worker has neither"
    )
