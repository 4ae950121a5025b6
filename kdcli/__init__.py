"""kdcli: train and distil one-stage object detectors for remote-sensing imagery."""

__version__ = "0.1.0"
