"""Run one benchmark on two trees in turn, pair after pair (a benchmark aid, not a test).

    .venv/bin/python bench/alternate.py REV --pairs 4 \\
        --setup "bench/profile_short.py submit --tasks 1500 --k 50" -- bench/profile_short.py work

Wall-clock and CPU figures on a small shared machine swing by a quarter from one run to
the next, and drift over minutes: two trees compared one after the other say little, and
compared in turn, pair by pair, say much more. ``REV`` (a commit, a branch, a tag) is
checked out in a temporary worktree; the other tree is this one, as it is on disk. Each
side runs the ``--setup`` command (if any) and then the benchmark with this virtualenv's
Python, from its own tree (its own ``bench/`` scripts) and importing its own ``qtasks``.
The commands are split like a shell's; each is a script and its arguments. What each run
prints last (``--lines``) is shown under the side it came from, the older side first in
every pair.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent.parent


def run(tree: pathlib.Path, command: str) -> str:
    """``command`` (a script of the tree and its arguments) with ``tree``'s qtasks; its output."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, *shlex.split(command)], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{command!r} failed in {tree} ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the other tree: a commit, branch or tag of this repository")
    parser.add_argument("command", nargs="+", help="the benchmark: a script of the tree and its arguments")
    parser.add_argument("--pairs", type=int, default=4, help="runs of each side (default 4)")
    parser.add_argument("--setup", help="run before each run of the benchmark, on the same side")
    parser.add_argument("--lines", type=int, default=2, help="last lines of each run's output shown (default 2)")
    args = parser.parse_args()
    command = shlex.join(args.command)
    with tempfile.TemporaryDirectory(prefix="qtasks-alternate-") as scratch:
        other = pathlib.Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", str(other), args.rev], check=True)
        try:
            sides = [(args.rev, other), ("this tree", HERE)]
            for pair in range(1, args.pairs + 1):
                for name, tree in sides:
                    if args.setup:
                        run(tree, args.setup)
                    shown = run(tree, command).strip().splitlines()[-args.lines :]
                    print(f"pair {pair}, {name}:")
                    for line in shown:
                        print(f"    {line}")
                    sys.stdout.flush()
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(other)], check=False)


if __name__ == "__main__":
    main()
