"""`lapa convert <what>`: bring models published elsewhere into this project's checkpoint format.

    lapa convert laq laq_openx.pt --out runs/laq_openx     # the LAPA release's LAQ weights
    lapa label --laq runs/laq_openx --data runs/data/sim  # then label with it
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lapa_cli import UserError, add_targets, chosen_target


# ---------------------------------------------------------------- laq
def add_laq_parser(sub) -> None:
    p = sub.add_parser(
        "laq", help="the LAPA release's LAQ weights (laq_openx.pt) -> a checkpoint `lapa label` and `lapa eval laq` read",
        description="Read the LAQ state dict the official LAPA release publishes (a raw PyTorch state dict, read "
                    "weights-only: no pickled objects) into a model of the release's architecture, and save it "
                    "as safetensors + JSON. Every tensor is mapped and shape-checked. The sizes come from the "
                    "weights; the image size and token count do not show in them (default: the release's 256 "
                    "and 4).")
    p.add_argument("weights", type=Path, help="the release's .pt file (e.g. laq_openx.pt)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--image-size", type=int, default=256, help="input side in pixels it was trained at (default 256)")
    p.add_argument("--tokens", type=int, default=4, help="latent tokens per frame pair, the release's code_seq_len "
                                                         "(default 4)")
    p.add_argument("--window-s", type=float, help="seconds between the frames of a pair it was trained on; "
                                                  "metadata for reports (default 2.5, the release's SSv2 offset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")


def run_laq(args) -> int:
    from lapa_training.checkpoint import META_FILE, CheckpointError
    from lapa_training.laq.convert_official_laq import ConversionError, convert_file

    if args.out.exists() and any(args.out.iterdir() if args.out.is_dir() else [args.out]):
        if not args.overwrite or not (args.out / META_FILE).is_file():
            raise UserError(f"{args.out} exists; choose another --out" +
                            (" or pass --overwrite" if (args.out / META_FILE).is_file() else ""))
    if args.window_s is not None and not args.window_s > 0:
        raise UserError("--window-s must be positive")
    try:
        model = convert_file(args.weights, args.out, image_size=args.image_size, num_tokens=args.tokens,
                             window_s=args.window_s)
    except (ConversionError, CheckpointError) as e:
        raise UserError(" ".join(str(e).split())) from None
    except OSError as e:
        raise UserError(f"cannot write {e.filename or args.out}: {e.strerror}") from None
    cfg = model.config
    print(f"converted {args.weights} -> {args.out}: {model.num_parameters():,} parameters, "
          f"{cfg.image_size[0]}x{cfg.image_size[1]} RGB, {cfg.num_tokens} tokens from a codebook of {cfg.codebook_size}")
    return 0


ACTIONS: dict[str, tuple[Callable, Callable[..., int]]] = {
    "laq": (add_laq_parser, run_laq),
}


def add_parser(sub) -> None:
    add_targets(sub, "convert", ACTIONS, "convert_command", "<target>",
                help="convert published models into this project's checkpoints",
                description="Convert published models into this project's checkpoint format. Targets: " +
                            ", ".join(ACTIONS) + ".")


def run(args) -> int:
    run_target = chosen_target(args, ACTIONS, "convert_command",
                               f"give a target: {', '.join(ACTIONS)} (see lapa convert --help)")
    return int(run_target(args) or 0)
