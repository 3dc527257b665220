"""The broker: state (a pure fold of events), the desk and scheduler (pure), the socket server."""
