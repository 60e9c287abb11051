"""The `lapa` command: one user CLI whose subcommands each start one job."""


class UserError(Exception):
    """A mistake the user can fix; `lapa` prints it as one line and exits 2, no traceback."""


def node_argv(executable: str, config, overrides: dict, ros_args: list[str]) -> list[str]:
    """argv for a node's main(): its parameter file, then CLI overrides (None = keep the file's value),
    then whatever the user put after --ros-args."""
    if not config.is_file():
        raise UserError(f"parameter file not found: {config}")
    argv = [executable, "--ros-args", "--params-file", str(config)]
    for name, value in overrides.items():
        if value is not None:
            argv += ["-p", f"{name}:={value}"]
    return argv + list(ros_args[1:] if ros_args else [])
