"""The examples people copy from: README.md and docs/examples/ must run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_streaming_example_streams_every_value(tmp_path: Path) -> None:
    result = run(ROOT / "docs" / "examples" / "streaming.py", "5")
    assert result.returncode == 0, result.stderr
    ticks = [line for line in result.stdout.splitlines() if "tick" in line]
    assert len(ticks) == 5 and "tick   4" in ticks[-1]
    assert "status=success yield_count=5 attempt=1" in result.stdout


def test_the_readme_example_runs_on_memory(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    script = tmp_path / "readme_example.py"
    script.write_text(code.group(1).replace('"kafka://127.0.0.1:9092"', '"memory://"'))
    result = run(script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:10] == [str(2 * i) for i in range(10)]
    assert "status='success'" in lines[10]
    merged: dict[str, list[tuple[int, int]]] = {}
    for line in lines[11:]:
        uuid, seq, value = line.split()
        merged.setdefault(uuid, []).append((int(seq), int(value)))
    assert sorted(map(len, merged.values())) == [3, 4, 5]  # the three tasks of count.map, every value
    assert all(items == [(i, 2 * i) for i in range(len(items))] for items in merged.values())


def test_the_delayed_example_runs_each_reminder_at_its_time_and_not_the_cancelled_one() -> None:
    result = run(ROOT / "docs" / "examples" / "delayed.py")
    assert result.returncode == 0, result.stderr
    ran = re.findall(r"(\w+): due at \+([\d.]+) s, ran at \+([\d.]+) s \((\w+)\)", result.stdout)
    assert sorted(who for who, *_ in ran) == ["ana", "bo", "dee", "eli"], result.stdout
    for who, due, at, status in ran:
        assert status == "success" and float(at) >= float(due), (who, due, at)
    assert "cy: cancel (plans changed), never ran" in result.stdout


def test_the_periodic_example_runs_each_tick_once_across_a_hand_over() -> None:
    result = run(ROOT / "docs" / "examples" / "periodic.py", "6")
    assert result.returncode == 0, result.stderr
    found = re.search(r"(\d+) runs for (\d+) ticks, run by \[.*\]; gaps \{1.0\}", result.stdout)
    assert found is not None, result.stdout
    assert found.group(1) == found.group(2) and int(found.group(1)) >= 2


def test_the_routers_example_runs_a_router_a_shared_task_and_a_middleware() -> None:
    result = run(ROOT / "docs" / "examples" / "routers.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "total: 2100 cents (success)",
        "picked 2 x tea",
        "picked 1 x mug",
        "audited order 7 paid",
        "total -> 2100",
        "pick -> None",  # a generator's values went out as they were yielded
        "order 7 paid",
        "audit -> 'audited order 7 paid'",
    ]


def test_the_ordering_example_applies_each_devices_events_in_order() -> None:
    result = run(ROOT / "docs" / "examples" / "ordering.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["pump-1", "pump-2", "valve-9"]
    assert all(line.endswith("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] (in order)") for line in lines), lines


def test_the_pipeline_example_runs_three_stages_through_each_other() -> None:
    result = run(ROOT / "docs" / "examples" / "pipeline.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("smoothed: [20.0, 20.82, 21.58") and lines[0].endswith("(30 values)")
    assert lines[1] == "alerts: {'values': 30, 'above': 11}"
    assert lines[2] == "hottest: {'sensor': 0, 'peak': 24.98}"


def test_the_durable_example_runs_in_a_second_process_what_the_first_queued(tmp_path: Path) -> None:
    first = run(ROOT / "docs" / "examples" / "durable.py", str(tmp_path / "queue"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("queued 3 tasks in")
    second = run(ROOT / "docs" / "examples" / "durable.py", str(tmp_path / "queue"))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [f"success: {name}: save to 640px" for name in ("a.png", "b.png", "c.png")]
