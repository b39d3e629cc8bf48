"""The dry-run report: one self-contained HTML page (no network; images inline) that shows a run at a glance:
the summary and score, where the time went against the budget, TTT loss curves, and per task the grids the kit
saw and answered, filterable by solved / unsolved / fallback.

It reads only what a run leaves beside its submission (`<stem>.run.json`, `<stem>.log.jsonl`, the submission)
and reloads the tasks from the source the run names, so it works after the run, on a killed run (status
"running") and on an old run without a summary (then without demonstrations or true outputs). Torch-free.

Over 400 lines on purpose: loading, the three pictures and the page's HTML and script are one page's parts, read
together when the page changes; none is used anywhere else.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from kit.atomic import write_text_atomic
from kit.grids import Grid
from kit.record import TaskRecord
from kit.results import log_path, read_task_records, summary_path
from kit.schedule import format_duration
from kit.tasks import Task, attach_solutions, load_bundled, load_challenges, load_solutions

ARC_COLOURS = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
               "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25")
ARC_CMAP = ListedColormap(ARC_COLOURS)
ARC_NORM = BoundaryNorm(np.arange(-0.5, 10), 10)
STATUSES = ("solved", "unsolved", "fallback", "unscored")  # a card's filter class (unscored: no true output)
STATUS_COLOURS = {"solved": "#2E8B57", "unsolved": "#C0392B", "fallback": "#888888", "unscored": "#1F5F9F"}
PHASE_NAMES = {"ttt": "TTT", "infer": "inference", "vote": "voting"}

# Task card picture: grids fitted into square boxes (inches at CARD_DPI), demonstrations two boxes a pair and
# test inputs four (input, attempt 1, attempt 2, truth), packed into rows of at most CARD_COLUMNS boxes.
CARD_DPI = 72
BOX = 1.3
GAP = 0.2
TITLE = 0.25
CARD_COLUMNS = 8
CANDIDATES_SHOWN = 5
LOSS_CURVES = 12  # per group (solved, unsolved) in the loss plot
LABELLED_POINTS = 20  # the budget plot names its tasks up to this many


@dataclass
class Card:
    """One task as the report shows it."""

    task_id: str
    status: str
    record: TaskRecord | None  # the task's last log record; None when the run logged none (no model, not reached)
    attempts: list[tuple[Grid, Grid]]  # from the submission: what is scored
    task: Task | None = None  # reloaded from the run's source; None when unknown or invalid
    solved: list[bool] | None = None  # per test input, when the true outputs are known

    @property
    def truths(self) -> list[Grid] | None:
        return self.task.test_outputs if self.task is not None else None


@dataclass
class RunData:
    submission_path: Path
    summary: dict  # <stem>.run.json; {} for a run that wrote none
    cards: list[Card] = field(default_factory=list)

    @property
    def records(self) -> list[TaskRecord]:
        return [c.record for c in self.cards if c.record is not None]


# --- loading ------------------------------------------------------------------------------------------------

def submission_path(run: Path) -> Path:
    """A run directory holds `submission.json`; a file is the submission itself."""
    return run / "submission.json" if run.is_dir() else run


def read_log(path: Path) -> dict[str, TaskRecord]:
    """Task id -> its last complete record (a torn last line from a kill is skipped)."""
    return {record.task: record for record in read_task_records(path)}


def reload_tasks(summary: dict, task_ids: list[str]) -> dict[str, Task]:
    """The run's tasks from the source it names (with true outputs where known); {} when it names none."""
    if summary.get("challenges"):
        task_set = load_challenges(summary["challenges"], skip_bad=True)
    elif summary.get("dataset"):
        task_set = load_bundled(summary["dataset"], skip_bad=True)
    else:
        return {}
    task_set = task_set.select(task_ids)
    if summary.get("solutions"):
        attach_solutions(task_set, load_solutions(summary["solutions"]), summary["solutions"])
    return {t.id: t for t in task_set.tasks}


def card_status(record: TaskRecord | None, solved: list[bool] | None) -> str:
    """Fallback: the kit gave no model answer (no record, no time, or the task failed); else solved only when
    every test output is."""
    if record is None or not record.model_answered:
        return "fallback"
    if solved is None:
        return "unscored"
    return "solved" if all(solved) else "unsolved"


def load_run(run: Path) -> RunData:
    path = submission_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such submission file (give a run's directory or its submission.json)")
    summary_file = summary_path(path)
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    submission = json.loads(path.read_text(encoding="utf-8"))
    records = read_log(log_path(path))
    task_ids = summary.get("task_ids") or list(submission)
    tasks = reload_tasks(summary, task_ids)
    data = RunData(path, summary)
    for task_id in task_ids:
        attempts = [(np.array(e["attempt_1"], dtype=np.uint8), np.array(e["attempt_2"], dtype=np.uint8))
                    for e in submission.get(task_id, [])]
        task, record = tasks.get(task_id), records.get(task_id)
        if task is not None and task.test_outputs is not None:
            solved = [any(np.array_equal(a, truth) for a in pair) for pair, truth in zip(attempts, task.test_outputs)]
        else:
            solved = record and record.solved
        data.cards.append(Card(task_id, card_status(record, solved), record, attempts, task, solved))
    return data


# --- pictures -----------------------------------------------------------------------------------------------

def png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def card_rows(card: Card) -> list[list[tuple[str, Grid, str]]]:
    """The card's grids as rows of (title, grid, title colour): demonstration pairs, then per test input its
    input, both attempts (green when right, red when wrong) and the true output when known."""
    units: list[list[tuple[str, Grid, str]]] = []
    if card.task is not None:
        units = [[(f"demo {i + 1} in", p.input, "black"), (f"demo {i + 1} out", p.output, "black")]
                 for i, p in enumerate(card.task.train)]
    first_test = len(units)
    truths = card.truths
    for i, pair in enumerate(card.attempts):
        unit = [] if card.task is None else [(f"test {i + 1} in", card.task.test_inputs[i], "black")]
        for k, attempt in enumerate(pair):
            if truths is None:
                unit.append((f"attempt {k + 1}", attempt, "black"))
            else:
                right = np.array_equal(attempt, truths[i])
                unit.append((f"attempt {k + 1} {'✓' if right else '✗'}", attempt,
                             STATUS_COLOURS["solved" if right else "unsolved"]))
        if truths is not None:
            unit.append(("true output", truths[i], "black"))
        units.append(unit)
    rows: list[list[tuple[str, Grid, str]]] = []
    for n, unit in enumerate(units):
        if not rows or n == first_test or len(rows[-1]) + len(unit) > CARD_COLUMNS:
            rows.append([])
        rows[-1].extend(unit)
    return rows


def draw_grids(rows: list[list[tuple[str, Grid, str]]]) -> str:
    """One picture for a whole card (one image per card keeps a 400-task page light): each grid scaled into
    its box, cells outlined, in the ARC palette."""
    step, line = BOX + GAP, BOX + GAP + TITLE
    width, height = max(len(r) for r in rows) * step, len(rows) * line
    fig = Figure(figsize=(width, height), dpi=CARD_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    for r, row in enumerate(rows):
        for c, (title, grid, colour) in enumerate(row):
            h, w = grid.shape
            cell = BOX / max(h, w)
            x, y = c * step + GAP / 2, r * line + TITLE
            ax.pcolormesh(x + cell * np.arange(w + 1), y + cell * np.arange(h + 1), grid, cmap=ARC_CMAP,
                          norm=ARC_NORM, edgecolors="#555555", linewidth=0.25 if max(h, w) > 15 else 0.5)
            ax.text(x, y - 0.05, title, fontsize=10, color=colour, va="bottom")
    return png_uri(fig)


def budget_plot(data: RunData) -> str | None:
    """Planned against actual seconds per task, and tasks finished against time with the deadline."""
    records = [r for r in data.records if r.seconds is not None]
    if not records:
        return None
    fig = Figure(figsize=(11, 3.8), dpi=80, layout="constrained")
    planned_ax, time_ax = fig.subplots(1, 2)
    status = {c.task_id: c.status for c in data.cards}
    planned = [r for r in records if r.planned_seconds is not None]
    for name in STATUSES:
        group = [r for r in planned if status[r.task] == name]
        if group:
            planned_ax.scatter([r.planned_seconds for r in group], [r.seconds for r in group], s=14,
                               color=STATUS_COLOURS[name], label=f"{name} ({len(group)})")
    if planned:
        if len(planned) <= LABELLED_POINTS:
            for r in planned:
                planned_ax.annotate(r.task, (r.planned_seconds, r.seconds), fontsize=7,
                                    xytext=(4, 2), textcoords="offset points")
        top = max(max(r.planned_seconds, r.seconds) for r in planned) * 1.05
        planned_ax.plot([0, top], [0, top], color="#999999", linewidth=0.8, linestyle="--", label="as planned")
        planned_ax.legend(fontsize=8)
    else:
        planned_ax.text(0.5, 0.5, "no planned times in this log", ha="center", transform=planned_ax.transAxes)
    planned_ax.set(xlabel="planned seconds", ylabel="actual seconds", title="time per task: planned against actual")
    if all(r.finished is not None for r in records):
        finished = sorted(r.finished for r in records)
    else:  # an old log: one worker, tasks back to back
        finished = list(np.cumsum([r.seconds for r in records]))
    s = data.summary
    marks = [(s[key], label, colour) for key, label, colour in (
        ("deadline_s", "deadline", "#C0392B"), ("budget_s", "budget", "black"), ("wall_s", "end of run", "#999999"))
        if s.get(key) is not None]
    unit, name = time_unit(max([finished[-1], *(m[0] for m in marks)]))
    time_ax.step([0.0, *np.divide(finished, unit)], range(len(finished) + 1), where="post", color="#1F5F9F",
                 label="tasks finished")
    for at, label, colour in marks:
        time_ax.axvline(at / unit, color=colour, linestyle="--", linewidth=1, label=f"{label} {format_duration(at)}")
    time_ax.set(xlabel=f"{name} since the start", ylabel="tasks finished",
                title=f"cumulative time ({len(finished)} of {len(data.cards)} tasks)")
    time_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    time_ax.legend(fontsize=8, loc="upper left")
    return png_uri(fig)


def time_unit(longest: float) -> tuple[float, str]:
    """Seconds, minutes or hours, whichever reads best up to `longest` seconds."""
    return (3600.0, "hours") if longest > 3 * 3600 else (60.0, "minutes") if longest > 300 else (1.0, "seconds")


def loss_plot(data: RunData) -> str | None:
    """TTT loss per step for an even sample of solved and of unsolved tasks."""
    groups = {name: [c for c in data.cards if c.status == name and c.record and c.record.losses]
              for name in STATUSES}
    if not any(groups.values()):
        return None
    fig = Figure(figsize=(11, 3.8), dpi=80, layout="constrained")
    ax = fig.subplots()
    handles = []
    for name, cards in groups.items():
        if not cards:
            continue
        sample = [cards[i] for i in np.unique(np.linspace(0, len(cards) - 1, LOSS_CURVES).round().astype(int))]
        for card in sample:
            losses = card.record.losses
            ax.plot(range(1, len(losses) + 1), np.maximum(losses, 1e-4), color=STATUS_COLOURS[name], alpha=0.6,
                    linewidth=1)
        handles.append(Line2D([], [], color=STATUS_COLOURS[name], label=f"{name} ({len(sample)} of {len(cards)})"))
    ax.set_yscale("log")
    ax.set(xlabel="TTT step", ylabel="loss (output tokens)", title="TTT loss curves")
    ax.legend(handles=handles, fontsize=8)
    return png_uri(fig)


# --- page ---------------------------------------------------------------------------------------------------

def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s" if value < 60 else format_duration(value)


def score_line(cards: list[Card]) -> str:
    scored = [c.solved for c in cards if c.solved is not None]
    if not scored:
        return "not scored (no true outputs)"
    solved, total = sum(map(sum, scored)), sum(map(len, scored))
    tasks = sum(all(s) for s in scored)
    return (f"{solved}/{total} test outputs solved ({solved / max(total, 1):.1%}); "
            f"{tasks}/{len(scored)} tasks fully solved")


def summary_rows(data: RunData) -> list[tuple[str, str]]:
    """The summary table, from run.json where the run wrote one, else from the log."""
    s, records = data.summary, data.records
    rows = [("status", s.get("status", "unknown (no run summary)")), ("started", s.get("started_at") or "–"),
            ("dataset", s.get("dataset") or s.get("challenges") or s.get("source") or "–")]
    if s.get("solutions"):
        rows.append(("solutions", s["solutions"]))
    rows += [("model", s.get("model") or ("none (baseline answers)" if "model" in s else "–")),
             ("backend / device", f"{s.get('backend') or '–'} / {s.get('device') or '–'}"),
             ("workers", str(s.get("workers", "–")))]
    if s.get("settings"):
        rows.append(("settings", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["settings"].items())))
    budget = (f"{format_duration(s['budget_s'])} (margin {seconds(s.get('margin_s'))}, deadline at "
              f"{seconds(s.get('deadline_s'))})" if s.get("budget_s") else "none")
    rows += [("budget", budget), ("wall time", seconds(s.get("wall_s")))]
    counts = s.get("counts") or {
        "trained": sum(bool(r.ttt_steps) for r in records if r.error is None),
        "inference only": sum(not r.ttt_steps and r.model_answered for r in records),
        "fallback (no time)": sum(r.fallback is not None for r in records),
        "failed": sum(r.error is not None for r in records)}
    rows.append(("tasks", f"{len(data.cards)}: " + ", ".join(f"{k} {v}" for k, v in counts.items())))
    phases = s.get("phases") or {p: sum(getattr(r, f"{p}_seconds") or 0.0 for r in records)
                                 for p in ("ttt", "infer", "vote")}
    rows.append(("time per phase", ", ".join(f"{PHASE_NAMES.get(k, k)} {seconds(v)}" for k, v in phases.items())))
    return rows


def card_facts(card: Card) -> str:
    """What the kit did with the task: steps, seconds, or why it kept its baseline."""
    r = card.record
    if r is None:
        return "no model answer in the log (baseline: the test input as both attempts)"
    if r.fallback is not None:
        return f"fallback ({r.fallback}): the test input as both attempts"
    facts = [f"failed, baseline kept: {r.error}"] if r.error is not None else []
    ran = r.ttt_seconds is not None  # solve_task ran: steps and seconds per phase were measured
    if ran:
        planned = f" of {r.planned_steps}" if r.planned_steps is not None else ""
        facts.append(f"TTT {r.ttt_steps}{planned} steps ({r.ttt_stopped or '–'}, {r.ttt_tokens:,} tokens)")
    if r.planned_views is not None:
        facts.append(f"{r.planned_views} views")
    parts = [f"{PHASE_NAMES[p]} {getattr(r, f'{p}_seconds'):.1f}" for p in ("ttt", "infer", "vote")] if ran else []
    if r.planned_seconds is not None:
        parts.append(f"planned {r.planned_seconds:.1f}")
    facts.append(f"{seconds(r.seconds)}" + (f" ({', '.join(parts)})" if parts else ""))
    if r.retried is not None:
        facts.append("retried smaller")
    facts += r.errors
    return " · ".join(facts)


def candidates_table(card: Card) -> str:
    """Per test input the top candidates: votes, score, which attempt it became, whether it is right."""
    rows = []
    for i, candidates in enumerate(card.record.candidates if card.record else []):
        truth = card.truths[i] if card.truths is not None else None
        attempts = card.attempts[i] if i < len(card.attempts) else ()
        for rank, cand in enumerate(candidates[:CANDIDATES_SHOWN], 1):
            grid = np.array(cand["grid"], dtype=np.uint8)
            became = ", ".join(f"attempt {k + 1}" for k, a in enumerate(attempts) if np.array_equal(a, grid))
            right = "" if truth is None else "✓" if np.array_equal(grid, truth) else "✗"
            rows.append(f"<tr><td>{i + 1}</td><td>{rank}</td><td>{cand['votes']}</td><td>{cand['score']:.3f}</td>"
                        f"<td>{grid.shape[0]}×{grid.shape[1]}</td><td>{became}</td><td>{right}</td></tr>")
        if len(candidates) > CANDIDATES_SHOWN:
            rows.append(f"<tr><td>{i + 1}</td><td colspan=6>… {len(candidates) - CANDIDATES_SHOWN} more</td></tr>")
    if not rows:
        return ""
    return ("<table class=cands><tr><th>test</th><th>#</th><th>votes</th><th>score</th><th>shape</th>"
            "<th>became</th><th>right</th></tr>" + "".join(rows) + "</table>")


def card_html(card: Card) -> str:
    score = "" if card.solved is None else f" {sum(card.solved)}/{len(card.solved)}"
    rows, task_id = card_rows(card), html.escape(card.task_id)  # ids are file stems for a task directory
    picture = (f'<img alt="grids of task {task_id}" src="{draw_grids(rows)}">'
               if rows else "<p>no grids: the run's tasks could not be reloaded</p>")
    return (f'<section class="card {card.status}" id="task-{task_id}"><h3>{task_id} '
            f'<span class="badge {card.status}">{card.status}{score}</span></h3>'
            f"<p class=facts>{html.escape(card_facts(card))}</p>{picture}{candidates_table(card)}</section>")


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
table.summary td{padding:2px 12px 2px 0;vertical-align:top}table.summary td:first-child{color:#666}
.score{font-size:1.4em;font-weight:600}.warn{background:#fff3cd;padding:.5em 1em;border-radius:4px}
img.plot{max-width:100%}
.filter input{display:none}
.filter label{display:inline-block;padding:4px 12px;margin:0 4px 1em 0;border:1px solid #bbb;border-radius:14px;
 cursor:pointer}
.filter input:checked+label{background:#1F5F9F;color:#fff;border-color:#1F5F9F}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em 1em;margin:0 0 1em;content-visibility:auto;
 contain-intrinsic-size:auto 420px}
.card h3{margin:.2em 0}.card img{max-width:100%}.facts{color:#444;font-size:.9em}
.badge{font-size:.75em;padding:2px 8px;border-radius:10px;color:#fff;vertical-align:middle}
table.cands{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.cands td,table.cands th{border-bottom:1px solid #eee;padding:1px 10px;text-align:right}
""" + "".join(f".badge.{s}{{background:{c}}}" for s, c in STATUS_COLOURS.items()) + "".join(
    f"#show-{s}:checked~#cards .card:not(.{s}){{display:none}}" for s in STATUSES)


def filter_html(cards: list[Card]) -> str:
    """CSS-only filter: radio buttons that hide the cards of every other status (no script)."""
    counts = {s: sum(c.status == s for c in cards) for s in STATUSES}
    shown = [s for s in STATUSES if s != "unscored" or counts[s]]
    buttons = [f'<input type=radio name=show id=show-all checked><label for=show-all>all ({len(cards)})</label>']
    buttons += [f"<input type=radio name=show id=show-{s}><label for=show-{s}>{s} ({counts[s]})</label>"
                for s in shown]
    return "".join(buttons)


def render(data: RunData) -> str:
    s = data.summary
    title = f"ARC dry run: {s.get('dataset') or s.get('source') or data.submission_path.name}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class=score>Score: {html.escape(score_line(data.cards))}</p>"]
    if s.get("status") == "running":
        parts.append("<p class=warn>The run did not finish (killed, or still going): "
                     f"{len(data.records)} of {len(data.cards)} tasks in the log; the others show their baseline "
                     "answer.</p>")
    parts.append("<table class=summary>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                   for k, v in summary_rows(data)) + "</table>")
    for heading, uri in (("Budget", budget_plot(data)), ("TTT loss", loss_plot(data))):
        if uri:
            parts.append(f'<h2>{heading}</h2><img class=plot alt="{heading} plot" src="{uri}">')
    parts.append(f"<h2>Tasks</h2><div class=filter>{filter_html(data.cards)}<div id=cards>")
    parts += [card_html(c) for c in data.cards]
    parts.append("</div></div></body></html>")
    return "".join(parts)


def write_report(run: Path, out: Path | None = None) -> Path:
    """Write the report of the run at `run` (its directory or its submission.json) to `out`, by default
    `<stem>.report.html` beside the submission; return the path written."""
    data = load_run(Path(run))
    out = out or data.submission_path.with_name(data.submission_path.stem + ".report.html")
    write_text_atomic(out, render(data))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kit.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, metavar="RUN", help="the run's directory (holding submission.json) or its "
                                                         "submission file")
    p.add_argument("--out", type=Path, metavar="FILE", help="default: <stem>.report.html beside the submission")
    args = p.parse_args(argv)
    try:
        path = write_report(args.run, args.out)
    except (OSError, ValueError) as e:  # a missing or bad run file (TaskError, JSON): one line that names it
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
