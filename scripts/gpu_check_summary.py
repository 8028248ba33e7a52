"""summary.md of a ``scripts/gpu_check.sh`` run: the device and versions, each stage with its status and
duration, the tests that failed, every performance target of every benchmark with PASS / FAIL / n/a / not
run and its figure (judged again here, by each benchmark's own ``evaluate_targets``, on the run's JSON
lines), the fwd+bwd times of every provider, what ``wmsa_decide.py`` found, the training step's peak
memory per setting (``train_memory.py``), each short-term module's training step and token assembly
(``short_term.py``), each training objective's step and EMA update (``objectives.py``) and each compared config's
step and streaming frames/s with the trunks alone (``baselines.py``).

    python scripts/gpu_check_summary.py --stages STAGES.tsv --log gpu_check.log --results gpu_check.jsonl
        --env env.txt --commit SHA --mode gpu|rehearsal --seconds N --budget N --out summary.md

stages.tsv: one line per step (stage, step, exit status or "-" when not run, seconds, limit, note), as the
script writes it. The summary is also printed; it is kept short enough to come back from a machine that
returns only the end of the output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = {
    "install": "offline install (pip --no-index, wheelhouse .whl/)",
    "a": "environment",
    "b": "correctness: gpu_quick tests, Triton backends",
    "c": "op benchmarks, quick",
    "d": "wmsa_decide.py, quick",
    "e": "model: ResNet-101 training step, streaming, training memory, short-term modules, objectives, baselines",
    "f": "CUDA extension: build, gpu_quick tests, timings",
}
TIMEOUT_CODES = {"124", "137"}
INJECTED = "97"
OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
NODE = re.compile(r"(tests/\S+?::\S+)")
MAX_STDOUT = 11000  # characters of the summary printed in full; past that the timing tables are left out


@dataclass
class Step:
    stage: str
    name: str
    rc: str
    seconds: int
    limit: int
    note: str
    log: str = ""
    tests: dict = field(default_factory=dict)  # node id -> outcome
    failures: dict = field(default_factory=dict)  # node id -> short reason

    @property
    def status(self) -> str:
        if self.rc == "-":
            return f"not run ({self.note})" if self.note else "not run"
        if self.rc == INJECTED:
            return "FAIL (injected)"
        if self.rc in TIMEOUT_CODES:
            return f"TIMEOUT ({self.limit} s)"
        if self.rc != "0":
            return f"FAIL (exit {self.rc})"
        counts = Counter(self.tests.values())
        if self.tests and not counts["PASSED"] and counts["SKIPPED"] == len(self.tests):
            return f"not run (no GPU: {len(self.tests)} tests skipped)"
        return "PASS"


def read_steps(stages: Path, log: Path) -> list[Step]:
    """The steps of stages.tsv, each with its part of the log and the tests it ran."""
    steps = []
    if stages.exists():
        for line in stages.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 5:
                continue
            stage, name, rc, seconds, lim, *note = parts
            steps.append(Step(stage, name, rc, int(seconds), int(lim), " ".join(note).strip()))
    text = log.read_text(errors="replace") if log.exists() else ""
    # the log holds one "### step STAGE NAME ..." header per step, in the order of stages.tsv
    chunks = re.split(r"^### step ", text, flags=re.M)[1:]
    for s, chunk in zip(steps, chunks, strict=False):
        s.log = chunk
        for line in chunk.splitlines():
            outcome, node = OUTCOME.search(line), NODE.search(line)
            if outcome and node:
                s.tests[node.group(1)] = outcome.group(1)
                if outcome.group(1) in ("FAILED", "ERROR") and " - " in line:
                    s.failures[node.group(1)] = line.split(" - ", 1)[1].strip()[:160]
    return steps


def stage_status(steps: list[Step]) -> str:
    statuses = [s.status for s in steps]
    for word in ("FAIL", "TIMEOUT"):
        if any(x.startswith(word) for x in statuses):
            return word
    if statuses and all(x.startswith("not run") for x in statuses):
        return "not run"
    return "PASS"


def step_detail(s: Step) -> str:
    counts = Counter(s.tests.values())
    tests = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
    note = s.note if s.rc not in ("-", INJECTED) else ""  # the status says it
    return "; ".join(x for x in (f"{s.name}: {s.status}", tests, note) if x)


# ------------------------------------------------------------------------------------------ benchmarks
def load_results(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def rows_of(records: list[dict], benchmark: str, on_gpu: bool):
    """The benchmark's rows as ``harness.Row`` objects (GPU rows only, or CPU rows only)."""
    from benchmarks.harness import Row

    names = {f.name for f in fields(Row)}
    return [
        Row(**{k: v for k, v in r.items() if k in names})
        for r in records
        if r.get("benchmark") == benchmark and "provider" in r and (r.get("device") == "cuda") == on_gpu
    ]


# the benchmarks whose targets are judged (each script's SPEC: its targets and target cases)
TARGETS = ("stt_window_attn", "mixffn_dwconv", "ocr_region_pool", "gcc_assign", "ssltm_model")


def target_lines(records: list[dict], why_not_run: dict[str, str]) -> list[str]:
    """One table row per target: judged on the GPU rows, "not run" for a target case without rows."""
    from benchmarks.harness import match_device_spec

    lines = []
    for benchmark in TARGETS:
        try:
            spec = importlib.import_module(f"benchmarks.{benchmark}").SPEC
            rows = rows_of(records, benchmark, on_gpu=True)
            gpu = next((r.get("gpu") for r in records if r.get("benchmark") == benchmark and r.get("gpu")), None)
            device = match_device_spec(gpu)
            results = spec.targets(rows, device.bytes_per_s if device else None) if rows else []
            ran = {r.case for r in rows}
            for t in results:
                lines.append(f"| {benchmark} | {t.case} | {t.target} | {t.provider} | {t.value} | {t.status} |")
            why = "not in this run's cases" if rows else why_not_run.get(benchmark, "no GPU rows")
            for case in spec.target_cases:
                if case not in ran:
                    lines.append(f"| {benchmark} | {case} | all targets | - | - | not run ({why}) |")
        except Exception as error:  # one benchmark's broken judge must not hide the others' targets
            lines.append(
                f"| {benchmark} | - | all targets | - | - | not judged ({type(error).__name__}: {str(error)[:120]}) |"
            )
    return lines


def timing_lines(records: list[dict]) -> list[str]:
    """Per benchmark and case: each provider's fwd+bwd (else fwd) ms and peak MiB, as measured."""
    by = defaultdict(dict)
    for r in records:
        if "provider" not in r or "mode" not in r:
            continue
        key = (r["benchmark"], r["case"])
        by[key].setdefault(r["mode"], {})[r["provider"]] = r
    lines = []
    for (benchmark, case), modes in by.items():
        mode = "fwd+bwd" if "fwd+bwd" in modes else next(iter(modes))
        cells = []
        for provider, r in modes[mode].items():
            if r.get("ms") is None:
                error = r.get("error") or "no time"
                cells.append(f"{provider} -" + ("" if error.startswith(("unavailable", "skipped")) else " FAILED"))
                continue
            peak = f" {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else ""
            wrong = " WRONG" if r.get("correct") is False else ""
            cells.append(f"{provider} {r['ms']:.3g}{peak}{wrong}")
        lines.append(f"- {benchmark} {case} {mode} ms: " + ", ".join(cells))
    return lines


def decide_lines(records: list[dict]) -> list[str]:
    """What wmsa_decide.py recorded: ceilings, the gate, the decision."""
    lines = []
    for r in (r for r in records if r.get("benchmark") == "wmsa_decide" and "section" in r):
        section = r["section"]
        if section == "ceilings":
            values = {k: r.get(k) for k in ("copy_bytes_per_s", "gemm_flops", "exp_per_s")}
            if any(v is not None for v in values.values()):
                lines.append(
                    "- ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items() if isinstance(v, (int, float)))
                )
        elif section == "gate":
            ok = r.get("ok")
            detail = r.get("error") or ""
            lines.append(
                f"- gate {r.get('case')} {r.get('backend')}: "
                f"{'PASS' if ok else 'not run' if ok is None else 'FAIL'} {detail[:120]}".rstrip()
            )
        elif section == "decision":
            lines.append(
                f"- decision: default backend {r.get('default_backend')} ({r.get('why')}); gate failures "
                f"{r.get('gate_failures') or 'none'}"
            )
    return lines


def memory_lines(records: list[dict]) -> list[str]:
    """What train_memory.py measured: one line per setting."""
    lines = []
    for r in (r for r in records if r.get("benchmark") == "train_memory" and "crop" in r):
        setting = (
            f"- {r.get('backbone')} {r['crop']}x{r['crop']}, batch {r.get('batch')}, checkpointing "
            f"{'on' if r.get('checkpointing') else 'off'}, amp {r.get('amp')} on {r.get('gpu') or r.get('device')}"
        )
        if r.get("peak_mib") is None:
            lines.append(f"{setting}: FAILED {(r.get('error') or '')[:120]}".rstrip())
        else:
            lines.append(f"{setting}: {r['peak_mib']:.0f} MiB peak ({r.get('measure')}), {r['step_s']:.2f} s a step")
    return lines


def short_term_lines(records: list[dict]) -> list[str]:
    """What short_term.py measured: one line per case (fwd+bwd, peak memory, flow per pair, or why none), then
    one per micro-benchmark (fwd, fwd+bwd, peak memory, or why none)."""
    lines = []
    for r in (r for r in records if r.get("benchmark") == "short_term" and "case" in r):
        where = r.get("gpu") or r.get("device")
        setting = (
            f"- {r['case']} ({r.get('short_term')}, {r.get('frames')} frames"
            f"{', flow ' + r['flow'] if r.get('flow') else ''}): {r.get('backbone')} {r.get('size')}x{r.get('size')}, "
            f"B={r.get('batch')}, {r.get('dtype')} on {where}{' (tiny)' if r.get('tiny') else ''}"
        )
        if r.get("status") != "ok":
            lines.append(f"{setting}: {str(r.get('status')).upper()} {(r.get('reason') or '')[:120]}".rstrip())
            continue
        figures = [f"{r['step_ms']:.1f} ms fwd+bwd (median of {r.get('steps')})"]
        if r.get("peak_mib") is not None:
            figures.append(f"{r['peak_mib']:.0f} MiB peak")
        if r.get("flow_ms_per_pair") is not None:
            figures.append(f"flow {r['flow_ms_per_pair']:.1f} ms/pair")
        lines.append(f"{setting}: {', '.join(figures)}")
    for r in (r for r in records if r.get("benchmark") == "short_term" and "micro" in r):
        setting = (
            f"- {r['micro']} (key/value gathering alone, {r.get('keys')} keys, {r.get('queries')} queries): "
            f"{r.get('size')}x{r.get('size')} map, {r.get('channels')} channels, B={r.get('batch')}, {r.get('dtype')} "
            f"on {r.get('gpu') or r.get('device')}{' (tiny)' if r.get('tiny') else ''}"
        )
        if r.get("status") != "ok":
            lines.append(f"{setting}: {str(r.get('status')).upper()} {(r.get('reason') or '')[:120]}".rstrip())
            continue
        figures = [f"{r['fwd_ms']:.2f} ms fwd, {r['fwd_bwd_ms']:.2f} ms fwd+bwd (median of {r.get('steps')})"]
        if r.get("peak_mib") is not None:
            figures.append(f"{r['peak_mib']:.0f} MiB peak")
        lines.append(f"{setting}: {', '.join(figures)}")
    return lines


def _figures(r: dict, *extra: tuple[str, str]) -> str:
    """A step record's figures: its fwd+bwd median, peak memory and each ``(key, text)`` of ``extra`` it holds
    (``text`` formats the value)."""
    figures = [f"{r['step_ms']:.1f} ms fwd+bwd (median of {r.get('steps')})"]
    if r.get("peak_mib") is not None:
        figures.append(f"{r['peak_mib']:.0f} MiB peak")
    figures += [text.format(r[key]) for key, text in extra if r.get(key) is not None]
    return ", ".join(figures)


def _where(r: dict) -> str:
    return f"{r.get('gpu') or r.get('device')}{' (tiny)' if r.get('tiny') else ''}"


def _not_ok(r: dict) -> str | None:
    """``STATUS reason`` of a record without figures, else None."""
    if r.get("status") == "ok":
        return None
    return f"{str(r.get('status')).upper()} {(r.get('reason') or '')[:120]}".rstrip()


def objectives_lines(records: list[dict]) -> list[str]:
    """What objectives.py measured: one line per case (fwd+bwd, peak memory, the EMA update, or why none)."""
    lines = []
    for r in (r for r in records if r.get("benchmark") == "objectives" and "case" in r):
        flow = f", flow {r['flow']}" if r.get("flow") else ""
        setting = (
            f"- {r['case']} ({', '.join(r.get('objectives') or []) or 'no objective'}{flow}): {r.get('backbone')} "
            f"{r.get('size')}x{r.get('size')}, B={r.get('batch')}, {r.get('dtype')} on {_where(r)}"
        )
        lines.append(f"{setting}: {_not_ok(r) or _figures(r, ('ema_ms', 'EMA update {:.2f} ms'))}")
    return lines


def baselines_lines(records: list[dict]) -> list[str]:
    """What baselines.py measured: one line per config (fwd+bwd, peak memory, streaming frames/s, or why none),
    then one per trunk."""
    lines = []
    for r in (r for r in records if r.get("benchmark") == "baselines" and "config" in r):
        if r.get("backbone") is None:  # the config did not load
            lines.append(f"- {r['config']}: {_not_ok(r)}")
            continue
        objectives = f" + {', '.join(r['objectives'])}" if r.get("objectives") else ""
        setting = (
            f"- {r['config']} ({r.get('backbone')} {r.get('decoder')} {r.get('short_term')}{objectives}): "
            f"{r.get('size')}x{r.get('size')}, B={r.get('batch')}, {r.get('dtype')} on {_where(r)}"
        )
        stream = "{:.1f} frames/s streaming " + "x".join(map(str, r.get("stream_size") or []))
        lines.append(f"{setting}: {_not_ok(r) or _figures(r, ('stream_fps', stream))}")
    for r in (r for r in records if r.get("benchmark") == "baselines" and "trunk" in r):
        setting = f"- trunk {r['trunk']} alone: {r.get('size')}x{r.get('size')}, B={r.get('batch')}, {r.get('dtype')}"
        lines.append(f"{setting} on {_where(r)}: {_not_ok(r) or _figures(r, ('params', '{:,} parameters'))}")
    return lines


# --------------------------------------------------------------------------------------------- summary
def summarize(args: argparse.Namespace) -> str:
    steps = read_steps(args.stages, args.log)
    records = load_results(args.results)
    env = args.env.read_text().strip() if args.env.exists() else "(no environment report: stage a did not run)"
    by_stage = defaultdict(list)
    for s in steps:
        by_stage[s.stage].append(s)
    out = [
        f"# GPU check ({args.mode}): commit {args.commit}",
        "",
        f"{args.seconds} s in all (time budget {args.budget} s for the stages); "
        f"{len(records)} JSON lines in gpu_check.jsonl",
        "",
        "```",
        env,
        "```",
        "",
        "## Stages",
        "",
        "| stage | what | status | seconds | steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for stage, what in STAGES.items():
        group = by_stage.get(stage, [])
        if not group:
            out.append(f"| {stage} | {what} | not run (no step recorded) | 0 | |")
            continue
        out.append(
            f"| {stage} | {what} | {stage_status(group)} | {sum(s.seconds for s in group)} | "
            + " · ".join(step_detail(s) for s in group)
            + " |"
        )

    failures = [
        (s.stage, node, s.failures.get(node, outcome))
        for s in steps
        for node, outcome in s.tests.items()
        if outcome in ("FAILED", "ERROR")
    ]
    if failures:
        out += ["", "## Failed tests", ""]
        out += [f"- {stage}: {node} {why}" for stage, node, why in failures[:25]]
        if len(failures) > 25:
            out.append(f"- ... and {len(failures) - 25} more (gpu_check.log)")

    # a benchmark without GPU rows: why (its step's status)
    why_not_run = {}
    for s in steps:
        bench = s.name.split()[0]
        if bench in TARGETS and bench not in why_not_run:
            why_not_run[bench] = f"stage {s.stage}: {s.status if s.status != 'PASS' else 'no GPU rows'}"
    out += [
        "",
        "## Targets",
        "",
        "| benchmark | case | target | provider | measured | status |",
        "| --- | --- | --- | --- | --- | --- |",
        *target_lines(records, why_not_run),
    ]
    decided = decide_lines(records)
    if decided:
        out += ["", "## wmsa_decide", "", *decided]
    memory = memory_lines(records)
    if memory:
        out += ["", "## Training-step memory", "", *memory]
    modules = short_term_lines(records)
    if modules:
        out += ["", "## Short-term modules (training step, token assembly)", "", *modules]
    objectives = objectives_lines(records)
    if objectives:
        out += ["", "## Training objectives (training step, EMA update)", "", *objectives]
    baselines = baselines_lines(records)
    if baselines:
        out += ["", "## Compared configs (training step, streaming) and trunks", "", *baselines]
    text = "\n".join(out) + "\n"
    timings = timing_lines(records)
    if timings:
        full = text + "\n".join(["", "## Times (the providers' fwd+bwd, else fwd)", "", *timings]) + "\n"
        text = full if len(full) <= MAX_STDOUT else text + "\n(times left out for length: see gpu_check.jsonl)\n"
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=Path, required=True, help="stages.tsv written by scripts/gpu_check.sh")
    p.add_argument("--log", type=Path, required=True, help="the run's log")
    p.add_argument("--results", type=Path, required=True, help="the run's JSON lines")
    p.add_argument("--env", type=Path, required=True, help="the environment report of stage a")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--mode", choices=("gpu", "rehearsal"), default="gpu")
    p.add_argument("--seconds", type=int, default=0, help="the run's wall time")
    p.add_argument("--budget", type=int, default=0, help="the stages' time budget")
    p.add_argument("--out", type=Path, required=True, help="summary.md to write")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    text = summarize(args)
    args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
