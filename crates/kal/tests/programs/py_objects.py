"""Keeps N small objects alive in a list: N tuples of two ints (3 malloc blocks each
under PYTHONMALLOC=malloc, plus the list), then exits, or with "wait" says
"ready PID" and sleeps until killed (for live checks)."""
import os
import signal
import sys

n = int(sys.argv[1])
keep = [(i, i + 1) for i in range(1000, 1000 + n)]
names = {str(i): i for i in range(n // 10)}  # some dicts and strings too
if len(sys.argv) > 2 and sys.argv[2] == "wait":
    print("ready", os.getpid(), flush=True)
    while True:
        signal.pause()
print("kept", len(keep), len(names), flush=True)
