"""The one error class that the ``sahs`` command shows as a single line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix (a config value, a damaged cache, a missing model).

    Its message is one line that names the problem and the fix. ``sahs`` prints it alone; ``--debug``
    (or ``SAHS_DEBUG=1``) shows the traceback as well. Anything else is a bug and keeps its traceback.
    """
