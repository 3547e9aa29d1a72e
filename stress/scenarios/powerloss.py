"""power-loss: every crash state a POSIX-ish persistence model allows, checked (ALICE-style).

Each scenario of `stress.powerloss_writers.catalog` runs its writer(s) under strace, and
`stress.powerloss` replays the trace on a model of the store directory: at every crash
point, every subset of the directory operations not yet fsynced (sampled when there are
many) and every prefix / torn tail of the file data not yet fsynced is materialized, opened
with a fresh store and checked. Proves: every acknowledged call survives power loss, each
session is its last acknowledged state or the state of the call in flight, `verify()` finds
no damage, and the store is writable afterwards without losing or resurrecting anything;
also after a writer was SIGKILLed and another one built on what it left (issue 10).

The default run uses the long mode (every crash point, exhaustive subsets when few) with the
long workloads; ``--quick`` runs a few scenarios in short mode (tests/test_powerloss.py runs
them all, the issue-10 sequences and the mutation proofs included). Needs strace.
"""

from __future__ import annotations

from pathlib import Path

from stress.common import Config, ScenarioResult
from stress.powerloss import Budget, Options, ScenarioReport, run_scenario, strace_binary
from stress.powerloss_writers import LONG, SHORT, catalog, with_params

NAME = "powerloss"
QUICK_SCENARIOS = ("first-append", "appends", "delete")
"""--quick: a few cheap scenarios (a couple of seconds each)."""


def run(cfg: Config, workdir: Path) -> ScenarioResult:
    result = ScenarioResult(NAME)
    strace_binary()  # no strace: the scenario crashes with a message saying so
    params = with_params(SHORT if cfg.quick else LONG, durable=cfg.durable)
    scenarios = catalog(params)
    names = list(QUICK_SCENARIOS) if cfg.quick else list(scenarios)
    options = Options(
        budget=Budget.short() if cfg.quick else Budget.long(),
        seed=cfg.seed,
    )
    reports: list[ScenarioReport] = []
    for name in names:
        report = run_scenario(scenarios[name], workdir / name, options)
        reports.append(report)
        result.seconds += report.seconds
        result.ops += report.calls
        result.acknowledged += report.acks
        result.violations += [f"{name}: harness error: {e}" for e in report.errors]
        result.violations += [f"{name}: {v.render()}" for v in report.violations]
        if report.violation_count > len(report.violations):
            result.violations.append(
                f"{name}: {report.violation_count - len(report.violations)} more violating "
                f"states (work dir kept: {workdir / name})"
            )
    result.details.update(
        mode=options.budget.mode,
        scenarios={
            r.name: {
                "ok": r.ok,
                "crash_points": r.crash_points,
                "states": r.states_generated,
                "distinct_trees": r.states_distinct,
                "checks": r.checks,
                "violating_states": r.violation_count,
                "seconds": round(r.seconds, 1),
            }
            for r in reports
        },
    )
    return result
