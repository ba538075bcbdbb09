"""What every environment shares: its error, the hash that assigns items to splits, closing on every path."""
import hashlib


class EnvError(RuntimeError):
    """An environment could not be built or a task could not be found; the message says which."""


def stable_frac(key):
    """A number in [0, 1) fixed by a string: assigns games/items to splits the same way everywhere."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16 ** 8


class ClosingEnv:
    """`with make_env(...) as env:` closes the environment (and its JVM) on every path."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # The plan reset() found and the engine it opened (self._plan, self._env): ALFWorld's and ScienceWorld's;
    # the BFCL environments keep other state and define their own.
    def expert_plan(self):
        return list(self._plan)

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None


# What an environment answers to an action it does not accept (the worker and the importer flag it).
INVALID_FEEDBACK = {"alfworld": ("Nothing happens.",), "scienceworld": ("No known action matches that input.",)}
