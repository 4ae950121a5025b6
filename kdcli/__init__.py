"""kdcli: train and distil one-stage object detectors for remote-sensing imagery."""

import time

__version__ = "0.1.0"
STARTED = time.perf_counter()  # the process's start, near enough: `kdcli train` reports its first step from here
