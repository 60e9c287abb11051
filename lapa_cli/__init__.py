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


def torch_device(name: str):
    """--device: auto (cuda when present), cpu, cuda, cuda:N -> torch.device, or a UserError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def add_targets(sub, name: str, actions: dict, dest: str, metavar: str, **parser_kwargs):
    """`lapa NAME <target>`: a subcommand whose targets are ACTIONS {target: (add_parser, run)}."""
    p = sub.add_parser(name, **parser_kwargs)
    targets = p.add_subparsers(dest=dest, metavar=metavar)
    for add, _ in actions.values():
        add(targets)
    return p


def chosen_target(args, actions: dict, dest: str, missing: str):
    """The run function of the target the user named, or a UserError saying `missing`."""
    chosen = getattr(args, dest)
    if chosen is None:
        raise UserError(missing)
    return actions[chosen][1]
