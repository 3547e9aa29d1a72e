"""Retry budget: a holder keeps a session lock; contenders in other processes and threads try.

Long rounds: the holder keeps the lock until every contender gave up. Every contender
(`lock()`, `append_loop`, `update`, from other processes and from other threads of the
holder's own process) must fail with `SessionLocked` after no less than the budget
(`lock_timeout`) and no more than budget + 2 poll intervals + SLACK. Contenders with
`lock_timeout=0` must fail within 2 polls + SLACK. Short rounds: the holder lets go after a
fraction of the budget and every contender must succeed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from stress import procs
from stress.common import (
    AckLog,
    Config,
    ScenarioResult,
    error_kind,
    make_loop,
    make_session,
    open_store,
    read_logs,
    start_and_join,
    summarize,
    touch,
    wait_for,
)
from stress.scenarios._base import final_checks, prepare

NAME = "retry-budget"
SID = "contended"
DEFAULT_SLACK_S = 0.5
"""Allowed lateness beyond budget + 2 polls. Measured on a 2-core machine shared with other
jobs (see README "Stress suite"): overshoot past the budget median ~1 ms, p99 ~40 ms, worst
~0.2 s when the whole machine stalled; 0.5 s keeps CI reliable while a store that slept a
whole extra budget (or never gave up) still fails loudly."""
SHORT_HOLD_FRACTION = 0.15
"""Short rounds hold the lock this fraction of the budget: the rest absorbs the queue of
contenders each taking the lock in turn, on a machine whose scheduler may pause us."""
FLOAT_TOLERANCE_S = 0.001
LONG_ROUNDS_QUICK, SHORT_ROUNDS_QUICK = 3, 2
LONG_ROUNDS, SHORT_ROUNDS = 6, 4
ROUND_TIMEOUT_S = 120.0


def _attempt(store: Any, kind: str, tag: str) -> None:
    if kind == "lock":
        with store.lock(SID):
            return
    loop = make_loop(SID, tag, tag)
    if kind == "append":
        store.append_loop(SID, loop)
        return

    def fn(session: Any) -> Any:
        session.loops.append(loop)
        return session

    store.update(SID, fn)


def _contender(
    spec: dict[str, Any], t: int, store: Any, zero_store: Any, ctl: Path, log: AckLog
) -> None:
    kinds = ("lock", "append", "update")
    for rnd in range(spec["rounds"]):
        if not wait_for(ctl / f"go-{rnd}", ROUND_TIMEOUT_S):
            return
        mode = json.loads((ctl / f"round-{rnd}.json").read_text())["mode"]
        use_zero = mode == "long" and t == 0
        kind = kinds[(t + rnd) % len(kinds)]
        tag = f"{spec['name']}t{t}r{rnd}"
        t0 = time.monotonic()
        try:
            _attempt(zero_store if use_zero else store, kind, tag)
            outcome, err = "ok", None
        except Exception as exc:
            outcome, err = "fail", error_kind(exc)
        wait = time.monotonic() - t0
        log.write(
            k="try", rnd=rnd, mode=mode, op=kind, zero=use_zero, outcome=outcome, err=err, wait=wait
        )


def _holder(spec: dict[str, Any], store: Any, ctl: Path) -> None:
    for rnd in range(spec["rounds"]):
        if not wait_for(ctl / f"round-{rnd}.json", ROUND_TIMEOUT_S):
            return
        plan = json.loads((ctl / f"round-{rnd}.json").read_text())
        with store.lock(SID):
            touch(ctl / f"held-{rnd}")
            wait_for(ctl / f"go-{rnd}", ROUND_TIMEOUT_S)
            if plan["mode"] == "long":
                wait_for(ctl / f"release-{rnd}", ROUND_TIMEOUT_S)
            else:
                time.sleep(plan["hold_s"])
        touch(ctl / f"released-{rnd}")


def worker(spec: dict[str, Any]) -> None:
    root, ctl = Path(spec["root"]), Path(spec["ctl"])
    logdir = Path(spec["logdir"])
    # durable=False: this scenario measures the lock budget; fsync stalls of seconds on a
    # shared disk would only lengthen the queue in short rounds and make them flaky.
    kw = {"lock_poll_interval": spec["poll"], "durable": False}
    store = open_store(root, lock_timeout=spec["budget"], **kw)
    zero_store = open_store(root, lock_timeout=0.0, **kw)
    holder_store = open_store(root, lock_timeout=ROUND_TIMEOUT_S, **kw) if spec["holder"] else None
    logs = [AckLog(logdir / f"{spec['name']}t{t}.log") for t in range(spec["threads"])]
    touch(logdir / f"{spec['name']}.ready")
    ths = [
        threading.Thread(target=_contender, args=(spec, t, store, zero_store, ctl, logs[t]))
        for t in range(spec["threads"])
    ]
    if holder_store is not None:
        ths.append(threading.Thread(target=_holder, args=(spec, holder_store, ctl)))
    start_and_join(ths)
    for lg in logs:
        lg.close()


def run(cfg: Config, workdir: Path) -> ScenarioResult:
    result = ScenarioResult(NAME)
    root, logdir, store = prepare(cfg, workdir)
    ctl = workdir / "ctl"
    ctl.mkdir()
    budget, poll, slack = cfg.retry_budget_s, cfg.lock_poll_interval, cfg.retry_slack_s
    store.save(make_session(SID, [("contended.initial", "contended.initial")]))
    n_long, n_short = (
        (LONG_ROUNDS_QUICK, SHORT_ROUNDS_QUICK) if cfg.quick else (LONG_ROUNDS, SHORT_ROUNDS)
    )
    modes = ["long"] * n_long + ["short"] * n_short
    cfg.rng(NAME).shuffle(modes)
    names = [f"p{p}" for p in range(max(2, cfg.processes))]
    specs = [
        {
            "name": n,
            "root": str(root),
            "ctl": str(ctl),
            "logdir": str(logdir),
            "threads": cfg.threads,
            "rounds": len(modes),
            "holder": i == 0,
            "budget": budget,
            "poll": poll,
        }
        for i, n in enumerate(names)
    ]
    ps = procs.start(worker, specs)
    procs.wait_ready(logdir, names, ps)
    contenders = len(names) * cfg.threads
    t_start = time.monotonic()
    for rnd, mode in enumerate(modes):
        touch(
            ctl / f"round-{rnd}.json",
            json.dumps({"mode": mode, "hold_s": budget * SHORT_HOLD_FRACTION}),
        )
        if not wait_for(ctl / f"held-{rnd}", ROUND_TIMEOUT_S):
            result.violations.append(f"round {rnd}: holder never got the lock")
            break
        procs.go(ctl / f"go-{rnd}")
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while _tries_done(logdir, rnd) < contenders and time.monotonic() < deadline:
            time.sleep(0.01)
        if mode == "long":
            touch(ctl / f"release-{rnd}")
        if not wait_for(ctl / f"released-{rnd}", ROUND_TIMEOUT_S):
            result.violations.append(f"round {rnd}: holder never released")
            break
    result.seconds = time.monotonic() - t_start
    result.violations += procs.join_all(ps, procs.JOIN_GRACE_S)

    upper = budget + 2 * poll + slack
    waits_long: list[float] = []
    waits_zero: list[float] = []
    waits_short: list[float] = []
    for writer, lines in read_logs(logdir).items():
        for ln in lines:
            result.ops += 1
            zero = ", lock_timeout=0" if ln["zero"] else ""
            where = f"{writer} round {ln['rnd']} ({ln['mode']}, {ln['op']}{zero})"
            if ln["outcome"] == "ok":
                result.acknowledged += 1
            else:
                result.count_failure(ln["err"])
            w = float(ln["wait"])
            if ln["mode"] == "short":
                waits_short.append(w)
                if ln["outcome"] != "ok":
                    result.violations.append(
                        f"{where}: failed with {ln['err']} after {w:.3f} s despite a short hold"
                    )
                continue
            if ln["outcome"] == "ok" or ln["err"] != "SessionLocked":
                result.violations.append(
                    f"{where}: expected SessionLocked, got {ln['err'] or 'success'} after {w:.3f} s"
                )
                continue
            if ln["zero"]:
                waits_zero.append(w)
                zero_upper = 2 * poll + slack
                if w > zero_upper:
                    result.violations.append(
                        f"{where}: gave up after {w:.3f} s > 2 polls + slack ({zero_upper:.3f} s)"
                    )
                continue
            waits_long.append(w)
            if w < budget - FLOAT_TOLERANCE_S:
                result.violations.append(
                    f"{where}: gave up after {w:.3f} s, before the budget {budget} s"
                )
            if w > upper:
                result.violations.append(
                    f"{where}: gave up after {w:.3f} s > budget + 2 polls + slack = {upper:.3f} s"
                )
    result.lock_waits = summarize(waits_long)
    result.latency = summarize(waits_short)
    overshoot = summarize([w - budget for w in waits_long])
    result.details.update(
        budget_s=budget,
        poll_s=poll,
        slack_s=slack,
        upper_bound_s=round(upper, 3),
        rounds=modes,
        overshoot_past_budget=_round(overshoot),
        waits_timeout=_round(result.lock_waits),
        waits_lock_timeout_0=_round(summarize(waits_zero)),
        waits_short_hold=_round(summarize(waits_short)),
    )
    expected = {"long": len(names) * cfg.threads, "short": len(names) * cfg.threads}
    result.details["attempts_per_round"] = expected["long"]
    final_checks(result, store, root, [SID], workdir)
    return result


def _round(d: dict[str, float] | None) -> dict[str, float] | None:
    return {k: round(v, 4) for k, v in d.items()} if d else None


def _tries_done(logdir: Path, rnd: int) -> int:
    n = 0
    for p in logdir.glob("*.log"):
        for raw in p.read_text().splitlines():
            if f'"rnd":{rnd},' in raw:
                n += 1
    return n
