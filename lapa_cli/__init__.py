"""The `lapa` command: one user CLI whose subcommands each start one job."""


class UserError(Exception):
    """A mistake the user can fix; `lapa` prints it as one line and exits 2, no traceback."""
