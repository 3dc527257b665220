"""evo: an event-sourced orchestrator for ML training across a few heterogeneous machines."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy, so `import evo` inside a job stays cheap
    if name == "Client":
        from evo.client import Client

        return Client
    if name in ("report", "result", "checkpoint", "checkpoint_dir", "input", "artifact",
                "should_stop", "stop_if_asked", "Stopped"):
        from evo import job

        return getattr(job, name)
    raise AttributeError(f"module 'evo' has no attribute {name!r}")


__all__ = ["Client", "Stopped", "artifact", "checkpoint", "checkpoint_dir", "input", "report",
           "result", "should_stop", "stop_if_asked", "__version__"]
