"""Imported at start-up when this folder is on PYTHONPATH (scripts/server-thread-cpu): sets
Python's GIL switch interval to $SWITCH seconds, for measuring the server under it."""

import os
import sys

if os.environ.get("SWITCH", "default") != "default":
    sys.setswitchinterval(float(os.environ["SWITCH"]))
