import csv
import os
import subprocess
import sys
import textwrap

import pytest

from bench.store import COLUMNS, ResultsCorruptWarning, ResultsStore, StoreLockedError


def _row(cell_id, status="ok", **extra):
    return {"cell_id": cell_id, "status": status, "method": "kd", "student_acc": 90.5, **extra}


def test_rows_round_trip_and_replace(tmp_path):
    store = ResultsStore(tmp_path)
    store.put(_row("a"))
    store.put(_row("b", status="failed", error="ValueError: boom, with a comma\nand a newline"))
    store.put(_row("b"))  # a re-run replaces the failed row
    again = ResultsStore(tmp_path)
    assert set(again.rows) == {"a", "b"}
    assert again.status("b") == "ok"
    with open(tmp_path / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        assert len(list(reader)) == 2


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(KeyError, match="bogus"):
        ResultsStore(tmp_path).put(_row("a", bogus=1))


def test_truncated_file_keeps_good_rows_and_the_original(tmp_path):
    store = ResultsStore(tmp_path)
    for cid in "abc":
        store.put(_row(cid))
    path = tmp_path / "runs.csv"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # cut the last row in half
    with pytest.warns(ResultsCorruptWarning, match="truncated"):
        damaged = ResultsStore(tmp_path)
    assert set(damaged.rows) == {"a", "b"}
    backups = list(tmp_path.glob("runs.csv.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == data[: len(data) - 25]
    damaged.put(_row("c"))
    assert set(ResultsStore(tmp_path).rows) == {"a", "b", "c"}


def test_garbage_file_is_reported_not_overwritten(tmp_path):
    (tmp_path / "runs.csv").write_text("this is not,a results file\n1,2\n")
    with pytest.warns(ResultsCorruptWarning, match="lacks cell_id"):
        store = ResultsStore(tmp_path)
    assert store.rows == {} and store.problems
    assert list(tmp_path.glob("runs.csv.corrupt-*"))


def test_second_writer_is_refused(tmp_path):
    first = ResultsStore(tmp_path).lock()
    try:
        with pytest.raises(StoreLockedError, match="another `bench run`"):
            ResultsStore(tmp_path).lock()
    finally:
        first.unlock()
    ResultsStore(tmp_path).lock().unlock()


def test_sigkill_during_writes_leaves_a_valid_file(tmp_path):
    """A writer killed at a random moment leaves a parseable CSV with only complete rows."""
    script = textwrap.dedent(f"""
        from bench.store import ResultsStore
        s = ResultsStore({str(tmp_path)!r})
        i = 0
        while True:
            s.put({{"cell_id": f"c{{i}}", "status": "ok", "error": "x" * 2000}})
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    import time
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    store = ResultsStore(tmp_path)
    assert not store.problems
    assert len(store.rows) > 0
