"""`python -m stress`: hammer one loopstore from many processes and check the store's promises hold.

Exit status: 0 when every invariant held, 1 when any was violated (evidence printed),
2 on a usage error or when a scenario could not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stress.common import Config, ScenarioResult

SCENARIOS = {
    "hot-session": "stress.scenarios.hot",
    "many-sessions": "stress.scenarios.many",
    "retry-budget": "stress.scenarios.retry",
    "kill-9": "stress.scenarios.kill",
    "readers": "stress.scenarios.readers",
    "mixed": "stress.scenarios.mixed",
    "faults": "stress.scenarios.faultinj",
    "powerloss": "stress.scenarios.powerloss",
}
QUICK_SECONDS = 4.0
"""Per timed scenario in --quick: with start-up and checks the whole run stays near a minute."""
QUICK_KILL_ROUNDS = 6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stress", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes per scenario (default 4; quick 3)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="threads per worker process (default 3; quick 2)"
    )
    ap.add_argument(
        "--seconds", type=float, default=None, help="duration of each timed scenario (default 10)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="work directory (kept); default: a temp dir, removed",
    )
    ap.add_argument(
        "--scenario",
        action="append",
        default=None,
        help=f"scenario to run, repeatable, or 'all' (default): {', '.join(SCENARIOS)}",
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="also write the results as JSON to FILE"
    )
    ap.add_argument("--quick", action="store_true", help="about a minute in total (what CI runs)")
    ap.add_argument(
        "--kill-rounds", type=int, default=None, help="kill -9 rounds (default 10; quick 6)"
    )
    ap.add_argument(
        "--lock-timeout", type=float, default=5.0, help="lock_timeout of the writers (s)"
    )
    ap.add_argument(
        "--retry-budget",
        type=float,
        default=1.0,
        help="lock_timeout in the retry-budget scenario (s)",
    )
    ap.add_argument(
        "--retry-slack",
        type=float,
        default=None,
        help="allowed lateness beyond budget + 2 polls (s)",
    )
    ap.add_argument(
        "--fault-rate", type=float, default=0.03, help="injected-fault rate per write call"
    )
    ap.add_argument("--no-durable", action="store_true", help="open stores with durable=False")
    return ap.parse_args(argv)


def build_config(ns: argparse.Namespace, root: Path) -> Config:
    from stress.scenarios.retry import DEFAULT_SLACK_S

    quick = bool(ns.quick)
    return Config(
        processes=ns.processes or (3 if quick else 4),
        threads=ns.threads or (2 if quick else 3),
        seconds=ns.seconds or (QUICK_SECONDS if quick else 10.0),
        seed=ns.seed,
        root=root,
        quick=quick,
        lock_timeout=ns.lock_timeout,
        durable=not ns.no_durable,
        kill_rounds=ns.kill_rounds or (QUICK_KILL_ROUNDS if quick else 10),
        retry_budget_s=ns.retry_budget,
        fault_rate=ns.fault_rate,
        retry_slack_s=ns.retry_slack if ns.retry_slack is not None else DEFAULT_SLACK_S,
    )


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def _dist(d: dict[str, float] | None) -> str:
    if not d:
        return "-"
    return f"{_fmt_s(d['min'])} / {_fmt_s(d['median'])} / {_fmt_s(d['p99'])} / {_fmt_s(d['max'])}"


def render(console: Console, results: list[ScenarioResult], total_s: float) -> None:
    table = Table(title=f"loopstore stress ({total_s:.0f} s)", show_lines=True)
    for col in (
        "scenario",
        "ops",
        "acked",
        "failures by kind",
        "latency min/med/p99/max",
        "lock waits min/med/p99/max",
        "acked/s",
        "result",
    ):
        table.add_column(col, overflow="fold")
    for r in results:
        fails = "\n".join(f"{k}: {v}" for k, v in sorted(r.failures.items())) or "-"
        ok = "[green]ok[/]" if not r.violations else f"[red]{len(r.violations)} violations[/]"
        table.add_row(
            r.name,
            str(r.ops),
            str(r.acknowledged),
            fails,
            _dist(r.latency),
            _dist(r.lock_waits),
            f"{r.throughput:.0f}",
            ok,
        )
    console.print(table)
    for r in results:
        extra = {k: v for k, v in r.details.items() if k not in ("verify", "gc", "waits")}
        if extra:
            console.print(
                f"[bold]{r.name}[/]: " + ", ".join(f"{k}={_short(v)}" for k, v in extra.items())
            )
    for r in results:
        if r.violations:
            console.print(f"[red bold]{r.name}: invariants violated[/]")
            for v in r.violations[:30]:
                console.print(f"  - {v}", markup=False, highlight=False)
            if len(r.violations) > 30:
                console.print(f"  ... and {len(r.violations) - 30} more (see --json)")


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) < 200 else text[:197] + "..."


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    names = ns.scenario or ["all"]
    if "all" in names:
        names = list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)} or 'all'",
            file=sys.stderr,
        )
        return 2
    keep = ns.root is not None
    root = ns.root.resolve() if keep else Path(tempfile.mkdtemp(prefix="loopstore-stress-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = build_config(ns, root)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(
        f"stress: {names} processes={cfg.processes} threads={cfg.threads} seconds={cfg.seconds} "
        f"seed={cfg.seed} root={root}"
    )
    results: list[ScenarioResult] = []
    crashed = False
    start = time.monotonic()
    for name in names:
        workdir = root / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
        workdir.mkdir(parents=True)
        t0 = time.monotonic()
        with console.status(f"running {name} ..."):
            try:
                mod = importlib.import_module(SCENARIOS[name])
                res: ScenarioResult = mod.run(cfg, workdir)
            except Exception as exc:
                crashed = True
                res = ScenarioResult(name)
                res.violations.append(f"scenario crashed: {type(exc).__name__}: {exc}")
                res.details["traceback"] = traceback.format_exc()
                console.print(res.details["traceback"], markup=False, highlight=False)
        res.details["wall_s"] = round(time.monotonic() - t0, 2)
        console.print(
            f"{name}: {'ok' if not res.violations else 'VIOLATED'} in {res.details['wall_s']} s"
        )
        results.append(res)
    total = time.monotonic() - start
    render(console, results, total)
    if ns.json:
        payload = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
            "total_s": round(total, 2),
            "ok": all(not r.violations for r in results),
            "scenarios": [r.to_json() for r in results],
        }
        ns.json.write_text(json.dumps(payload, indent=2, default=str))
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    if any(r.violations for r in results):
        return 1
    return 2 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
