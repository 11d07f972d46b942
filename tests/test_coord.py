"""The coordination protocol under scripted interleavings: several in-process workers, each with its
own connection to one SQLite storage, take their steps in the order the test dictates (claim, crash,
recover, resume, race for the last slot and the last seed). Deterministic and fast; one end-to-end
multi-process test per storage kind lives in test_study.py and test_postgres.py."""

import math
from pathlib import Path

import optuna
import pytest
from conftest import Clock
from optuna.trial import TrialState

from study.coord import BEAT, SURPLUS, TUNE, Ledger, TrialSeededSampler, best_trial, final_key
from study.storage import open_storage

GRACE = 30


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def worker(url: str, clock: Clock, name: str = "s", heartbeat: int | None = 10) -> Ledger:
    """One worker's view: its own storage object (as a separate process would have)."""
    storage = open_storage(url, heartbeat_interval=heartbeat, grace_period=GRACE)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    return Ledger(storage, study, GRACE, clock=clock)


def finished(ledger: Ledger, key: str | None = None) -> list:
    return [
        t
        for t in ledger.trials()
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and not t.user_attrs.get(SURPLUS)
        and (key is None or t.user_attrs.get("claim", TUNE) == key)
    ]


def tune_claim(ledger: Ledger, n: int):
    trial = ledger.study.ask()
    return ledger.settle(trial._trial_id, capacity=n)


def test_race_for_the_last_slot_then_a_crash_gives_the_slot_back(url):
    clock = Clock()
    a, b, c = (worker(url, clock) for _ in range(3))
    demand = {TUNE: 2}
    ca, cb = tune_claim(a, 2), tune_claim(b, 2)
    cc = tune_claim(c, 2)  # C saw the budget open before A and B claimed, and lost the race
    assert ca.won and cb.won and not cc.won
    assert c.open_key(demand) is None
    a.finish(ca.trial_id, TrialState.COMPLETE, 0.9)
    # B crashes while running (never finishes). A has nothing to claim but must not stop: not finished.
    assert a.open_key(demand) is None and not a.finished(demand)
    assert a.recover_stale() == []  # within the grace period nothing is failed
    clock.advance(GRACE + 1)
    assert a.recover_stale() == [cb.number]  # its beat never moved while A watched for the grace period
    assert a.open_key(demand) == TUNE
    again = tune_claim(a, 2)
    assert again.won
    a.finish(again.trial_id, TrialState.COMPLETE, 0.8)
    assert a.finished(demand) and c.finished(demand)
    assert len(finished(a)) == 2
    states = {t.number: t.state for t in a.trials()}
    assert states[cb.number] == TrialState.FAIL and states[cc.number] == TrialState.FAIL


def test_a_seed_claim_is_visible_from_creation_so_only_one_worker_runs_it(url):
    clock = Clock()
    a, b = worker(url, clock, "f"), worker(url, clock, "f")
    key = final_key(0, 1)
    demand = {key: 1, final_key(0, 2): 1}
    assert a.open_key(demand) == b.open_key(demand) == key  # both saw seed 1 free
    ta = a.create(key, {"source_trial": 0, "seed": 1})
    tb = b.create(key, {"source_trial": 0, "seed": 1})
    # Settled in the unlucky order: the later claim checks first. It sees the earlier one.
    assert not b.settle(tb).won
    assert a.settle(ta).won
    assert b.open_key(demand) == final_key(0, 2)
    seeds = [t.user_attrs["seed"] for t in a.trials() if t.state == TrialState.RUNNING]
    assert seeds == [1]


def test_final_runs_wait_for_other_workers_and_redo_a_dead_workers_seed(url):
    clock = Clock()
    a, b = worker(url, clock, "f"), worker(url, clock, "f")
    demand = {final_key(7, s): 1 for s in (1, 2, 3)}

    def claim(ledger):
        key = ledger.open_key(demand)
        return ledger.claim(key, {"source_trial": 7, "seed": int(key.rsplit("seed", 1)[1])})

    a1, b2 = claim(a), claim(b)
    a.finish(a1.trial_id, TrialState.COMPLETE, 0.97)
    a3 = claim(a)
    a.finish(a3.trial_id, TrialState.COMPLETE, 0.97)
    assert a.open_key(demand) is None and not a.finished(demand)  # seed 2 is in flight: A waits
    # B dies holding seed 2; once A has watched its beat stand still for the grace period, A gives it
    # back and runs it itself.
    assert a.recover_stale() == []
    clock.advance(GRACE + 1)
    assert a.recover_stale() == [b2.number]
    redo = claim(a)
    assert redo.key == final_key(7, 2) and redo.won
    a.finish(redo.trial_id, TrialState.COMPLETE, 0.96)
    assert a.finished(demand)
    assert sorted(t.user_attrs["seed"] for t in finished(a)) == [1, 2, 3]


def test_a_claim_whose_beat_moves_is_never_failed_and_is_once_it_stops(url):
    """Liveness is judged on the observer's own clock: a beat seen to change starts a new watch, so no
    two machines' clocks or time zones are ever compared."""
    clock = Clock()
    a, b = worker(url, clock), worker(url, clock)
    claim = tune_claim(a, 1)
    with a.heartbeat(claim.trial_id, interval=60):
        pass  # records the first beat, then stops
    assert a.storage.get_trial(claim.trial_id).system_attrs.get(BEAT) == 1
    assert b.recover_stale() == []  # B starts watching
    for count in (2, 3, 4):
        clock.advance(GRACE - 1)
        a.beat(claim.trial_id, count)
        assert b.recover_stale() == []  # moved since B last looked: alive, a new watch begins
    clock.advance(GRACE - 1)
    assert b.recover_stale() == []  # still within the grace period of the last beat
    clock.advance(2)
    assert b.recover_stale() == [claim.number]  # stood still for longer than the grace period


def test_a_stale_heartbeat_fails_the_trial(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'hb.db'}"
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="s")
    ledger = Ledger(storage, study, 1)
    claim = tune_claim(ledger, 1)
    with ledger.heartbeat(claim.trial_id, interval=1):
        pass
    import time

    time.sleep(2.2)  # SQLite's clock has one-second steps
    assert ledger.recover_stale() == [claim.number]


def test_a_paused_worker_whose_trial_was_failed_drops_its_result_and_goes_on(url):
    clock = Clock()
    a, b = worker(url, clock), worker(url, clock)
    demand = {TUNE: 1}
    paused = tune_claim(a, 1)
    assert b.recover_stale() == []  # B starts watching
    clock.advance(GRACE + 1)
    assert b.recover_stale() == [paused.number]
    redo = tune_claim(b, 1)
    assert redo.won
    assert a.finish(paused.trial_id, TrialState.COMPLETE, 0.5) is False  # resumed: too late, dropped
    b.finish(redo.trial_id, TrialState.COMPLETE, 0.9)
    assert [t.value for t in finished(a)] == [0.9] and a.finished(demand)


def resumed_proposals(url: str, runs: int = 3, per_run: int = 2) -> list[float]:
    """A lone worker's proposals over `runs` runs, each a new process resuming the last one's storage."""
    proposals = []
    for _ in range(runs):
        sampler = TrialSeededSampler(0, lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=10))
        study = optuna.create_study(storage=open_storage(url), study_name="s", sampler=sampler, load_if_exists=True)
        for _ in range(per_run):
            trial = study.ask()
            proposals.append(trial.suggest_float("lr", 1e-3, 1.0, log=True))
            study.tell(trial, 0.5)
    return proposals


def test_a_resumed_sampler_never_replays_earlier_trials(tmp_path: Path):
    first = resumed_proposals(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(set(first)) == 6
    # Reproducible: the same runs on a fresh storage propose the same values.
    assert resumed_proposals(f"sqlite:///{tmp_path / 'b.db'}") == first


def proposals_with_give_backs(url: str, given_back: set[int], n: int = 4) -> list[float]:
    """A lone worker's finished proposals until `n` finished, in a new process (a new sampler) after each
    ask whose index is in `given_back`: that trial is failed as Ctrl-C leaves it, having run nothing."""
    finished, asked = [], 0

    def sampler():
        return TrialSeededSampler(0, lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=2))

    study = optuna.create_study(storage=open_storage(url), study_name="s", sampler=sampler(), load_if_exists=True)
    while len(finished) < n:
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        asked += 1
        if asked - 1 in given_back:
            study.tell(trial, state=TrialState.FAIL)
            study = optuna.load_study(storage=open_storage(url), study_name="s", sampler=sampler())
            continue
        study.tell(trial, -abs(math.log(lr / 0.05)))  # a smooth objective: TPE's proposals depend on history
        finished.append(lr)
    return finished


def test_an_interrupted_search_resumes_to_the_proposals_of_the_uninterrupted_one(tmp_path: Path):
    # The fuzz case: Ctrl-C in trial 0, the same command again: trial 0's proposal must be re-asked, and
    # every later one be what the uninterrupted run proposes (startup and TPE proposals alike).
    straight = proposals_with_give_backs(f"sqlite:///{tmp_path / 'a.db'}", set())
    assert len(set(straight)) == 4
    assert proposals_with_give_backs(f"sqlite:///{tmp_path / 'b.db'}", {0}) == straight
    assert proposals_with_give_backs(f"sqlite:///{tmp_path / 'c.db'}", {0, 1, 3, 4}) == straight


def test_slots_are_the_smallest_not_held_by_a_live_earlier_trial():
    from study.coord import SLOT, free_slot

    def t(number, state, slot=None):
        value = 0.5 if state == TrialState.COMPLETE else None
        trial = optuna.trial.create_trial(state=state, value=value, system_attrs={} if slot is None else {SLOT: slot})
        trial.number = number
        return trial

    assert free_slot([], 0) == 0
    assert free_slot([t(0, TrialState.COMPLETE, 0), t(1, TrialState.FAIL, 1)], 2) == 1
    assert free_slot([t(0, TrialState.FAIL, 0), t(1, TrialState.RUNNING, 1)], 2) == 0
    assert free_slot([t(0, TrialState.COMPLETE), t(1, TrialState.PRUNED)], 2) == 2  # stored before slots: its number
    assert free_slot([t(0, TrialState.COMPLETE, 0), t(5, TrialState.COMPLETE, 1)], 3) == 1  # later trials hold nothing


def test_best_trial_skips_diverged_and_surplus_and_ties_go_to_the_earliest():
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    def t(number, value, **attrs):
        trial = create_trial(
            params={"lr": 0.1}, distributions={"lr": FloatDistribution(1e-3, 1.0)}, value=value, user_attrs=attrs
        )
        trial.number = number
        return trial

    trials = [t(0, 0.9), t(1, 0.95), t(2, 0.95), t(3, 0.99, diverged=True), t(4, 0.999, surplus=True)]
    assert best_trial(trials).number == 1
    assert best_trial([t(0, 0.5, diverged=True)]) is None


def test_work_on_a_claim_failed_while_its_worker_was_paused_is_dropped_not_raised(url):
    from study.engine import holding

    clock = Clock()
    a, b = worker(url, clock), worker(url, clock)
    paused = tune_claim(a, 1)
    assert b.recover_stale() == []  # B starts watching
    clock.advance(GRACE + 1)
    assert b.recover_stale() == [paused.number]
    with holding(a, paused.trial_id):  # A wakes up and writes to its trial: refused, dropped, A goes on
        a.storage.set_trial_user_attr(paused.trial_id, "curve", [])
        raise AssertionError("unreachable: the write above is refused")
    with pytest.raises(RuntimeError), holding(a, tune_claim(a, 2).trial_id):
        raise RuntimeError  # any other error gives the claim back
    assert [t.state for t in a.trials()][-1] == TrialState.FAIL
    with pytest.raises(KeyboardInterrupt), holding(a, tune_claim(a, 3).trial_id):
        raise KeyboardInterrupt  # a second signal stops at once: no write that could wait on a lock
    assert [t.state for t in a.trials()][-1] == TrialState.RUNNING  # the heartbeat rule fails it later


def test_a_retry_callbacks_waiting_copy_never_holds_a_seed_or_a_slot(url):
    """Optuna's RetryHeartbeatStaleTrialCallback (RetryFailedTrialCallback before 4.9), attached elsewhere,
    re-enqueues a dead claim as WAITING with its claim key: counted as live, it held the seed forever and
    the study never finished."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    clock = Clock()
    a, b = worker(url, clock, "f"), worker(url, clock, "f")
    demand = {final_key(0, 1): 1}
    dead = a.claim(final_key(0, 1), {"source_trial": 0, "seed": 1})
    assert b.recover_stale() == []
    clock.advance(GRACE + 1)
    assert b.recover_stale() == [dead.number]
    RetryHeartbeatStaleTrialCallback()(b.study, b.storage.get_trial(dead.trial_id))
    waiting = [t for t in b.trials() if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs["claim"] == final_key(0, 1)
    assert b.open_key(demand) == final_key(0, 1)  # the copy holds nothing: the seed is free
    redo = b.claim(final_key(0, 1), {"source_trial": 0, "seed": 1})
    assert redo.won
    b.finish(redo.trial_id, TrialState.COMPLETE, 0.97)
    assert a.finished(demand) and b.finished(demand)


def test_a_waiting_copy_in_a_search_is_run_by_the_next_ask_and_counts_once(url):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    clock = Clock()
    a, b = worker(url, clock), worker(url, clock)
    demand = {TUNE: 2}
    dead = tune_claim(a, 2)
    assert b.recover_stale() == []
    clock.advance(GRACE + 1)
    assert b.recover_stale() == [dead.number]
    RetryHeartbeatStaleTrialCallback()(b.study, b.storage.get_trial(dead.trial_id))
    assert b.open_key(demand) == TUNE
    first, second = tune_claim(b, 2), tune_claim(b, 2)  # the first ask runs the re-enqueued copy
    assert first.won and second.won and b.open_key(demand) is None
    for claim in (first, second):
        b.finish(claim.trial_id, TrialState.COMPLETE, 0.9)
    assert b.finished(demand) and len(finished(b)) == 2
    assert not [t for t in b.trials() if t.state == TrialState.WAITING]


def test_a_creation_race_on_a_fresh_database_is_retried_not_an_error(tmp_path, monkeypatch):
    """Scripted: the first attempt loses the race to create Optuna's tables (SQLite says 'table ...
    already exists'); the opener waits and opens what the winner made."""
    import sqlalchemy.exc

    import study.storage as storage_module

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    real, calls = optuna.storages.RDBStorage, []

    def losing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real(*args, **kwargs)  # the winner creates the schema ...
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(*args, **kwargs)  # ... and the loser opens it

    monkeypatch.setattr(storage_module.optuna.storages, "RDBStorage", losing_once)
    monkeypatch.setattr(storage_module, "pause", lambda s: None)
    assert open_storage(url).get_all_studies() == [] and len(calls) == 2


def test_a_full_server_mid_run_is_one_line_that_names_the_cause(tmp_path):
    """A worker that needs a new connection mid-run and finds every slot taken: Optuna wraps the driver's
    error in its own, and the line says what is wrong and how to continue, not "lost the connection"."""
    import sqlalchemy.exc

    from study.storage import StudyError, guarded

    def refused():
        try:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("FATAL:  sorry, too many clients already"))
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e

    with pytest.raises(StudyError, match="no free connection slot .*too many clients.*same command again"):
        guarded(refused, f"sqlite:///{tmp_path / 'absent.db'}")


def _open_at_once(url, barrier, errors):
    barrier.wait()
    try:
        open_storage(url)
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.put(f"{type(e).__name__}: {e}")


def test_six_commands_opening_one_fresh_sqlite_file_at_once_all_succeed(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'fresh{round_}.db'}"
        barrier, errors = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, barrier, errors)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 6
        assert errors.empty(), errors.get()


def test_sqlite_still_mine_and_the_write_are_one_step(url):
    """Scripted: worker A has checked that its claim is still running and is about to record its result
    when worker B, judging A dead, fails the claim. On SQLite B used to get in between (pysqlite begins a
    transaction only at the first write): A's result landed over the failure and B redid the seed. Now
    B waits for A's transaction; its failure finds the run finished and does nothing."""
    import threading

    clock = Clock()
    a, b = worker(url, clock, "f"), worker(url, clock, "f")
    claim = a.claim(final_key(0, 1), {"source_trial": 0, "seed": 1})
    checked, b_tried = threading.Event(), threading.Event()
    original = a.storage.check_trial_is_updatable

    def pause_after_checking(trial_id, state):
        original(trial_id, state)
        if not checked.is_set():
            checked.set()
            b_tried.wait(timeout=5)  # B's attempt either lands now (the bug) or waits for this transaction

    a.storage.check_trial_is_updatable = pause_after_checking
    result = {}
    finisher = threading.Thread(
        target=lambda: result.update(landed=a.finish(claim.trial_id, TrialState.COMPLETE, 0.97))
    )
    finisher.start()
    assert checked.wait(timeout=60)

    def fail_it():
        try:
            result["failed"] = b.storage.set_trial_state_values(claim.trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            result["failed"] = False
        b_tried.set()

    failer = threading.Thread(target=fail_it)
    failer.start()
    failer.join(timeout=120)
    finisher.join(timeout=120)
    assert result == {"landed": True, "failed": False}
    assert b.storage.get_trial(claim.trial_id).state == TrialState.COMPLETE
    assert b.open_key({final_key(0, 1): 1}) is None and b.finished({final_key(0, 1): 1})


def test_the_heartbeat_stops_when_the_work_stops_moving(url):
    """Liveness was 'the heartbeat thread is alive': a hung main thread kept its claim forever. With a
    progress clock the beat stops once the work has not moved for the stall time; the claim then goes
    stale like a dead worker's and is redone."""
    import time

    from study.coord import Progress

    clock = Clock()
    a, b = worker(url, clock, "f", heartbeat=1), worker(url, clock, "f", heartbeat=1)
    calls = []
    real = a.storage.record_heartbeat
    a.storage.record_heartbeat = lambda trial_id: (calls.append(trial_id), real(trial_id))
    moving, stuck = Progress(), Progress()
    stuck.last -= 1000  # no progress for 1,000 s
    claim = a.claim(final_key(0, 1), {"source_trial": 0, "seed": 1})
    with a.heartbeat(claim.trial_id, 0.01, moving.idle, stall=60):
        time.sleep(0.05)
    assert calls  # a moving run beats
    a.finish(claim.trial_id, TrialState.COMPLETE, 0.9)
    calls.clear()
    hung = a.claim(final_key(0, 2), {"source_trial": 0, "seed": 2})
    with a.heartbeat(hung.trial_id, 0.01, stuck.idle, stall=60):
        time.sleep(0.05)
    assert calls == []  # a hung one never does ...
    assert b.recover_stale() == []
    clock.advance(GRACE + 1)
    assert b.recover_stale() == [hung.number]  # ... so it is failed and its seed given back


# --- packs: a worker claims several keys and trains them in one pass; each keeps its own claim ----------


def test_two_workers_claim_disjoint_packs_and_a_dead_workers_whole_pack_is_redone_once(url):
    clock = Clock()
    a, b = worker(url, clock, "f"), worker(url, clock, "f")
    demand = {final_key(7, s): 1 for s in range(1, 7)}

    def claim_pack(ledger, keys):
        return [ledger.claim(k, {"source_trial": 7, "seed": int(k.rsplit("seed", 1)[1])}) for k in keys]

    seen_a, seen_b = a.open_keys(demand, 3), b.open_keys(demand, 3)
    assert seen_a == seen_b == [final_key(7, s) for s in (1, 2, 3)]  # both saw the same three free
    pack_a, lost_b = [], []
    for ka, kb in zip(seen_a, seen_b):  # interleaved, A a step ahead each time
        pack_a += claim_pack(a, [ka])
        lost_b += claim_pack(b, [kb])
    assert all(c.won for c in pack_a) and not any(c.won for c in lost_b)
    pack_b = claim_pack(b, b.open_keys(demand, 3))
    assert [c.key for c in pack_b] == [final_key(7, s) for s in (4, 5, 6)] and all(c.won for c in pack_b)
    assert a.open_keys(demand, 3) == []
    for c in pack_a:
        a.finish(c.trial_id, TrialState.COMPLETE, 0.97)
    # B dies holding its whole pack: A watches every one of its claims stand still, then fails them all.
    assert a.recover_stale() == []
    clock.advance(GRACE + 1)
    assert sorted(a.recover_stale()) == sorted(c.number for c in pack_b)
    redo = claim_pack(a, a.open_keys(demand, 3))
    assert [c.key for c in redo] == [c.key for c in pack_b] and all(c.won for c in redo)
    for c in redo:
        a.finish(c.trial_id, TrialState.COMPLETE, 0.96)
    assert a.finished(demand)
    assert sorted(t.user_attrs["seed"] for t in finished(a)) == [1, 2, 3, 4, 5, 6]  # no seed twice


def test_open_keys_respects_each_keys_capacity_and_the_limit(url):
    a = worker(url, Clock(), "f")
    demand = {"x": 2, "y": 1, "z": 1}
    assert a.open_keys(demand, 5) == ["x", "y", "z"] and a.open_keys(demand, 2) == ["x", "y"]
    a.create("y")
    a.create("x")
    assert a.open_keys(demand, 5) == ["x", "z"]  # x has one of its two slots left
    a.create("x")
    assert a.open_keys(demand, 5) == ["z"]


def pack_worker(tmp_path: Path, small, pack: int = 4):
    from study.config import Recipe, RunConfig, StudyConfig
    from study.engine import Worker

    cfg = StudyConfig(name="k", experiments=("recipe",), recipe=Recipe(depths=(2,), epochs=1, seeds=4, variants=()))
    run = RunConfig(storage=f"sqlite:///{tmp_path / 'k.db'}", out=tmp_path, pack=pack)
    return Worker(cfg, run, {"full": small}, open_storage(run.storage, 10, GRACE), env={})


def test_a_pack_interrupted_mid_run_keeps_its_finished_runs_gives_the_rest_back_and_a_rerun_is_exact(
    tmp_path, small, monkeypatch
):
    """Scripted: the pack's trainer reports one run finished and three interrupted (Ctrl-C mid-pack)."""
    from mnist_bench import interrupt
    from study import engine

    real = engine.train_pack

    def interrupted_after_the_first(models, data, configs, **kwargs):
        results = real(models[:1], data[:1], configs[:1], **kwargs)  # one data set per model
        return results + [engine.TrainResult(interrupted=True) for _ in models[1:]]

    monkeypatch.setattr(engine, "train_pack", interrupted_after_the_first)
    first = pack_worker(tmp_path, small)
    with pytest.raises(interrupt.Interrupted):
        first.step()
    ledger = first.ledgers[first.cells[0]][1]
    states = sorted((t.user_attrs["seed"], t.state) for t in ledger.trials())
    assert states == [(1, TrialState.COMPLETE)] + [(s, TrialState.FAIL) for s in (2, 3, 4)]
    monkeypatch.setattr(engine, "train_pack", real)
    again = pack_worker(tmp_path, small)
    again.work()
    done = finished(again.ledgers[again.cells[0]][1])
    assert sorted(t.user_attrs["seed"] for t in done) == [1, 2, 3, 4]  # each seed once
    assert {t.user_attrs["pack"] for t in done if t.user_attrs["seed"] > 1} == {3}  # the three redone together
    (tmp_path / "alone").mkdir()
    alone = pack_worker(tmp_path / "alone", small, pack=1)
    alone.work()
    by_seed = {t.user_attrs["seed"]: t.value for t in finished(alone.ledgers[alone.cells[0]][1])}
    assert {t.user_attrs["seed"]: t.value for t in done} == by_seed  # packed or not, the same test accuracies


def test_a_band_is_claimed_a_seed_at_a_time_and_split_among_a_commands_workers(tmp_path, small):
    from study.config import Matched, RunConfig, StudyConfig
    from study.engine import Worker, band_key

    cfg = StudyConfig(
        name="g",
        experiments=("matched",),
        matched=Matched(depths=(3,), budgets=(20_000,), band=(0.03, 0.1, 0.3), seeds=4, checks=()),
    )
    run = RunConfig(storage=f"sqlite:///{tmp_path / 'g.db'}", out=tmp_path, pack=12, workers=2)
    w = Worker(cfg, run, {"split": small}, open_storage(run.storage, 10, GRACE), env={})
    cell = w.cells[0]
    assert w.tune_demand(cell) == {}  # nothing tuned apart: every rate of the band is a final run
    demand, runs = w.final_demand(cell)
    assert list(demand) == [band_key(p, s) for s in range(1, 5) for p in range(3)]  # seed-major
    packs = []
    w.final_pack = lambda c, claimed: packs.append(list(claimed))  # what the worker would train next
    assert w.step() == "ran" and packs == [[band_key(p, 1) for p in range(3)]]  # one seed's rates: one batch order
    for key in packs[0]:
        w.ledgers[cell][1].claim(key)
    assert w.step() == "ran" and packs[1] == [band_key(p, 2) for p in range(3)]  # never mixes seeds
    assert Worker.pack_size(w, 10) == 5 and Worker.pack_size(w, 40) == 12  # 2 workers: half a budget each


def test_a_band_cell_packs_factorial_pack_and_a_check_cell_its_seeds():
    """A band cell packs one seed's rates (one batch order); a check retrains one chosen rate per seed, so
    its seeds pack together, each with its own order, instead of one network at a time."""
    from study.engine import Run, band_key, factorial_pack

    band = {band_key(p, s): Run(seed=s, source=-1, point=p) for s in (1, 2, 3) for p in range(3)}
    assert factorial_pack(list(band)[:3], band) == [band_key(p, 1) for p in range(3)]
    window = [band_key(2, 1), *[band_key(p, 2) for p in range(3)], band_key(0, 3)]  # a window cut mid-seed
    assert factorial_pack(window, band) == [band_key(2, 1)]  # never another seed's rates beside it
    assert factorial_pack(window[1:], band) == [band_key(p, 2) for p in range(3)]
    check = {band_key(2, s): Run(seed=s, source=-1, point=2) for s in range(1, 7)}
    assert factorial_pack(list(check)[:4], check) == list(check)[:4]


def test_a_runs_test_predictions_are_stored_as_a_string_and_read_back_exactly():
    import numpy as np
    import torch

    from study.coord import decode_predictions, encode_predictions

    predictions = torch.randint(0, 10, (10_000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    text = encode_predictions(predictions)
    assert isinstance(text, str) and len(text) == 13_336  # base64 of 10,000 bytes: any storage holds it
    assert np.array_equal(decode_predictions(text), predictions.numpy())
