"""What a fault test measured, gathered for the end-of-run table (and docs/kafka.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    """One fault, run with generator tasks streaming through it."""

    fault: str
    tasks: int
    values_each: int
    #: Tasks submitted that did not end in success.
    lost: int
    #: Streams (read live, and read again afterwards) not complete and in order.
    incomplete: int
    #: Value records in the results topic beyond one per (task, seq): the at-least-once cost.
    raw_duplicates: int
    #: Runs of a task beyond its first (seq-0 records beyond one per task).
    reruns: int
    #: The longest a live stream waited for its next value (or its first, from submission), s.
    longest_stall: float
    #: From the end of the fault until the last task ended, s.
    drained: float

    def line(self) -> str:
        return (
            f"| {self.fault} | {self.tasks} x {self.values_each} | {self.lost} | {self.incomplete} | "
            f"{self.raw_duplicates} | {self.reruns} | {self.longest_stall:.1f} s | {self.drained:.1f} s |"
        )


MEASURED: list[Measured] = []

HEADER = (
    "| fault | tasks x values | lost | incomplete streams | raw duplicates | re-runs | longest stall | drained |\n"
    "|---|---|---|---|---|---|---|---|"
)


def table(rows: list[Measured]) -> str:
    return "\n".join([HEADER, *(row.line() for row in rows)])
