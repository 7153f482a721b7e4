"""Errors a user can act on; the entry points print them as one line."""


class Q8Error(Exception):
    """Base of the errors that name their cause (config key, path, step)."""


class ConfigError(Q8Error, ValueError):
    """A configuration value is wrong; the message names the key."""


class DataError(Q8Error):
    """A dataset is missing or unreadable; the message says where the files must go."""


class CheckpointError(Q8Error):
    """A checkpoint is unreadable or does not fit the run; nothing was overwritten."""


class NonFiniteLossError(Q8Error):
    """Training produced a NaN/Inf loss; the message names the step."""


class RunFolderError(Q8Error):
    """The run folder cannot be used: another process trains there, or it cannot be written."""
