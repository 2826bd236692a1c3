"""The small error hierarchy. ``main()`` prints any of these as one line and exits 1."""


class AutodeployError(Exception):
    """An error the operator reads as one line; no traceback unless --debug."""


class ConfigError(AutodeployError):
    pass


class UpstreamError(AutodeployError):
    """An HTTP request failed (collector/http.py: upstream, a health URL, a FleetLock
    server), or upstream's answer is not what it must be (not a store path)."""


class NixError(AutodeployError):
    """A Nix command failed; the message carries Nix's own words."""


class SpaceError(AutodeployError):
    """A filesystem cannot take what the agent would write (collector/space.py); nothing
    was changed, and the next poll tries again (space can be freed meanwhile)."""


class StateError(AutodeployError):
    """A file in the state directory is corrupt or of an unknown version."""


class ActuatorError(AutodeployError):
    """A deploy failed, was refused, or could not be finished (actuator/)."""


class LockHeld(AutodeployError):
    """Another collector or actuator run holds the lock."""


class ProcessError(AutodeployError):
    def __init__(self, argv: list[str], returncode: int, message: str) -> None:
        super().__init__(f"{argv[0]} failed (exit {returncode}): {message}")
        self.argv = argv
        self.returncode = returncode
        self.message = message
