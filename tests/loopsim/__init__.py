"""The loop simulator: feedrank's closed loop in one process, in simulated time, for measuring the
error rates of the monitor's decisions (see twin.py and experiments.py)."""
