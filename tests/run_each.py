"""Run each test file in a pytest process of its own, then say the totals.

A file none of whose tests ran (all skipped, say for want of a GPU or a real checkpoint) is named in the summary,
not counted as passed.

One process per file keeps what a file compiles and loads from piling up across the suite (on 2 cores XLA:CPU
once crashed compiling late in a single long run, a crash that a fresh process did not repeat), and a crash in
native code fails only its file. Arguments go to every pytest run (e.g. -x, -k). The last line is the totals,
'N passed, N failed, N skipped', and the exit status is 0 only when every file passed (or was all skipped).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

COUNTS = ("passed", "failed", "skipped", "errors", "error", "xfailed", "xpassed", "crashed")


def main(argv: list[str], root: Path = Path(__file__).parent) -> int:
    files = sorted(root.rglob("test_*.py"), key=lambda p: p.relative_to(root).parts)
    totals = dict.fromkeys(COUNTS, 0)
    broken, all_skipped = [], []
    start = time.perf_counter()
    for i, path in enumerate(files, 1):
        name = path.relative_to(root).as_posix()
        print(f"[{i}/{len(files)}] {name}", flush=True)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", str(path), *argv], capture_output=True,
                              text=True)
        sys.stdout.write(done.stdout)
        sys.stdout.write(done.stderr)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        counts = {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", summary) if word in COUNTS}
        for word, number in counts.items():
            totals[word] += number
        if done.returncode in (0, 5) and not counts.get("passed") and not counts.get("xpassed"):
            all_skipped.append(name)  # nothing in it ran here (skipped, or deselected by -k): not a pass
        if done.returncode not in (0, 5):  # 5: no test collected (every test deselected by -k)
            broken.append(f"{name} (exit {done.returncode})")
            if not any(counts.get(word) for word in ("failed", "errors", "error")):
                totals["crashed"] += 1  # died before pytest could say (a signal in native code)
    print(f"\n{len(files)} files in {time.perf_counter() - start:.0f}s" +
          (f"; failed: {', '.join(broken)}" if broken else ""))
    if all_skipped:
        print(f"no test ran in {len(all_skipped)} files (see their skip reasons above): {', '.join(all_skipped)}")
    failed = totals["failed"] + totals["errors"] + totals["error"] + totals["crashed"]
    print(f"{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
