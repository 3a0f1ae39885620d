"""Domain errors. The CLI turns each into a one-line message and its exit code, in one place."""


class DitpipeError(Exception):
    """A problem the user can fix. The message names the file or key and says what to do."""

    exit_code = 1


class ConfigError(DitpipeError):
    """Invalid configuration. Carries every problem at once, each as (dotted key, message)."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]], header: str = "invalid configuration"):
        self.problems = problems
        lines = [f"{header} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  {key}: {msg}" if key else f"  {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


class DataError(DitpipeError):
    """Missing or unusable input data (dataset folders, downloads)."""


class CodecError(DitpipeError):
    """The VAE (or pixel codec) cannot be loaded or produced unusable output."""


class ShardError(DitpipeError):
    """Shards are missing, damaged, or do not match what was asked for."""
