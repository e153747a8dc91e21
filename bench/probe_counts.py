"""The bad-input probe's counts, as issue 35 reports them, from the cases of tests/test_bad_input.py.

    python bench/probe_counts.py                # every case (the whole file; the app's cases launch it in-process)
    python bench/probe_counts.py -k upload      # a subset: any further arguments go to pytest

A kind is one parametrized case: a `Case` at the app, the CLI or the Python API, a hostile upload, a bad LoRA, a bad
fine-tune request, a lora_scale without a LoRA, a value Gradio's own checks refuse. It should be refused when its
`Case.refuse` is True (every case of the other tables is). Its outcome comes from the test's own verdict: passed is
a clear sentence (or, for a case that must work, worked); a failure is sorted by its message into wrongly accepted
("accepted: ..."), a generic error (Gradio's generic message, "no sentence"), a hang ("no answer in"), a traceback in
the server's log, or another shortfall (a server path quoted, the entry not named, a sentence that reads wrong).
The file's other tests (captions from every source, the caps, the cost formula) are counted apart.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE_TESTS = {"test_app", "test_cli", "test_python", "test_hostile_upload_is_refused_whole",
              "test_bad_lora_is_refused_with_a_sentence", "test_bad_finetune_request_is_refused_at_once",
              "test_lora_scale_is_checked_even_without_a_lora", "test_gradio_refusals_log_one_line"}
GENERIC = "upstream Gradio app has raised an exception"


def verdict(report) -> str:
    """A failed case's outcome, from its exception's message (not the test's source, which names them all)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr)
    if "accepted: " in message:
        return "wrongly accepted"
    if GENERIC in message or "no sentence" in message:
        return "generic error"
    if "no answer in" in message or "Timeout" in message:
        return "hang"
    if "Traceback" in message or 'File "' in message:
        return "traceback logged"
    if "refused: " in message:
        return "wrongly refused"
    return "other shortfall"


class Tally:
    """A pytest plugin: each case's expectation at collection, its outcome as it runs."""

    def __init__(self):
        self.expect: dict[str, str] = {}  # nodeid -> "refuse" (with a sentence), "refuse, any message", "work",
        # "either" or "check" (not a case)
        self.outcome: dict[str, str] = {}
        self.examples: dict[str, list[str]] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            if item.originalname not in CASE_TESTS:
                self.expect[item.nodeid] = "check"
                continue
            case = getattr(item, "callspec", None) and item.callspec.params.get("case")
            refuse = True if case is None else case.refuse
            self.expect[item.nodeid] = {True: "refuse", False: "work", None: "either"}[refuse]
            if refuse and case is not None and not case.sentence:  # Gradio refuses it before any handler runs
                self.expect[item.nodeid] = "refuse, any message"

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.failed or report.skipped) and report.nodeid not in self.outcome:
            if report.passed:
                self.outcome[report.nodeid] = "passed"
            elif report.skipped:
                self.outcome[report.nodeid] = "skipped"
            else:
                self.outcome[report.nodeid] = verdict(report)
                self.examples.setdefault(self.outcome[report.nodeid], []).append(report.nodeid.split("::")[-1])


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    tally = Tally()
    status = pytest.main(["tests/test_bad_input.py", "-q", "-p", "no:cacheprovider", "--no-header", "-rN", *argv],
                         plugins=[tally])
    ran = {node: tally.outcome[node] for node in tally.expect if node in tally.outcome}
    kinds = [node for node in ran if tally.expect[node] != "check"]
    refuse = [node for node in kinds if tally.expect[node].startswith("refuse")]
    counts = Counter(ran[node] for node in refuse)
    sentence = sum(ran[node] == "passed" for node in refuse if tally.expect[node] == "refuse")
    gradio = sum(ran[node] == "passed" for node in refuse if tally.expect[node] != "refuse")
    print(f"\nkinds tried: {len(kinds)} ({len(refuse)} should be refused, "
          f"{sum(tally.expect[n] == 'work' for n in kinds)} should work, "
          f"{sum(tally.expect[n] == 'either' for n in kinds)} either)")
    print(f"should be refused: {len(refuse)}; a clear sentence: {sentence} ({sentence / max(1, len(refuse)):.0%}); "
          f"refused by Gradio before any handler, no sentence required: {gradio}; "
          f"wrongly accepted: {counts['wrongly accepted']}; "
          f"a generic error: {counts['generic error']}; hangs: {counts['hang']}; a traceback logged: "
          f"{counts['traceback logged']}; other shortfalls: {counts['other shortfall']}; skipped: {counts['skipped']}")
    others = Counter(ran[node] for node in kinds if not tally.expect[node].startswith("refuse"))
    print(f"should work or either: {sum(others.values())}; passed: {others['passed']}; "
          f"failed: {sum(others.values()) - others['passed'] - others['skipped']}")
    checks = Counter(ran[node] for node in ran if tally.expect[node] == "check")
    print(f"other tests of the file: {sum(checks.values())}; passed: {checks['passed']}")
    for outcome, nodes in tally.examples.items():
        print(f"  {outcome}: {', '.join(nodes[:5])}{', ...' if len(nodes) > 5 else ''}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
