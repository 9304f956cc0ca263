"""The one exception type whose message is shown to the user without a traceback."""


class TrainlabError(Exception):
    """A problem with the user's input (config, data, files, servers), explained in its message."""
