"""Holds a run directory's lock until its stdin closes or it is killed: a second process in the way.

    python tests/lock_holder.py RUN_DIR      # prints "locked" once it holds the lock

It takes the lock as the runner's ``RunDirectory.lock`` does (``hf_bwsk.layout.run_lock``, creating
the directory), without importing torch, so it starts in a tenth of a second.
"""

import sys

from hf_bwsk.layout import run_lock

if __name__ == "__main__":
    with run_lock(sys.argv[1], create=True):
        print("locked", flush=True)
        sys.stdin.read()
