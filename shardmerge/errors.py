"""The one exception type shardmerge raises for anything the user can fix.

The CLI prints its message as a single line and exits non-zero; the library lets it propagate.
Every message names the file, tensor or key at fault and, where there is one, what to do next.
"""


def os_reason(e: OSError) -> str:
    """What an OSError means, in the words a user needs (a full disk said plainly)."""
    import errno

    return "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))


class ShardmergeError(Exception):
    """Bad input, a refused output directory, or a failed write. `exit_code` is what the CLI returns."""

    exit_code = 1


class PlanError(ShardmergeError):
    """The plan file or its overrides are invalid (unknown key, wrong type, missing path)."""

    exit_code = 2


class InterruptedMerge(ShardmergeError):
    """SIGINT/SIGTERM arrived; the output directory is left resumable."""

    def __init__(self, signum: int):
        import signal

        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; the output is incomplete and resumable: "
            "re-run the same plan to finish it"
        )
        self.exit_code = 128 + signum
