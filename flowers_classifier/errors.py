"""`FlowersError`: the one base of every exception this project raises (runtime and trainer), so a caller can
catch them all with one clause (like `requests.RequestException`). Each error also keeps its built-in base
(`ValueError`, `RuntimeError`), so `except ValueError` around a call goes on catching what it caught."""


class FlowersError(Exception):
    """Base of the project's errors; the message says what went wrong, what to do, and names the file or flag."""
