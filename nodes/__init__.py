"""Node daemon: hardware probe, executor, warm workers, the daemon loop."""
