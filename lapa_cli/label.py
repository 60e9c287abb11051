"""`lapa label`: label every frame pair of datasets with latent-action tokens from a trained LAQ.

    lapa label --laq runs/laq --data runs/data/videos runs/data/sim
    torchrun --nproc_per_node 8 -m lapa_cli.main label --laq runs/laq --data runs/data/ssv2   # 8 processes
    accelerate launch --num_processes 8 -m lapa_cli.main label --laq runs/laq --data runs/data/ssv2

Several processes each label their share of the chunks; a killed labelling resumes when run again.
The tokens go beside each dataset, in <dataset>/labels/<name>/ (lapa_training/laq/labelling.py);
`lapa train pretrain --objective latent` reads them from there.
"""

from __future__ import annotations

from pathlib import Path

from lapa_cli import UserError, torch_device


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="label datasets' frame pairs with latent-action tokens (LAQ encoder)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--laq", type=Path, required=True,
                   help="LAQ training run (its model/ or newest checkpoint), checkpoint directory, or the LAPA "
                        "release's LAQ converted by `lapa convert laq`")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DATASET", help="datasets to label")
    p.add_argument("--name", default="laq", help="labels folder name under <dataset>/labels/ (default laq)")
    p.add_argument("--window-frames", type=int,
                   help="H in stored frames (default: what the LAQ was trained with, else each episode's window)")
    p.add_argument("--batch-size", type=int, default=256, help="frame pairs per forward pass (default 256)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace existing labels of that name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--camera", metavar="NAME", help="the camera to label, in datasets ingested with several "
                                                    "(default: the first)")


def run(args) -> int:
    from lapa_training.checkpoint import CheckpointError, read_meta
    from lapa_training.data.errors import IngestError
    from lapa_training.laq.labelling import LabelError, label_dataset
    from lapa_training.laq.loading import load_laq
    from lapa_training.trainer import latest_model_dir

    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.window_frames is not None and args.window_frames < 1:
        raise UserError("--window-frames must be >= 1")
    import os

    device = torch_device(args.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")  # one GPU per process
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    try:
        checkpoint = latest_model_dir(args.laq)
        model = load_laq(checkpoint)
        window = args.window_frames or read_meta(checkpoint).get("extra", {}).get("window_frames")
        for data in args.data:
            out = label_dataset(model, data, name=args.name, window_frames=window, batch_size=args.batch_size,
                                device=device, overwrite=args.overwrite, source=str(checkpoint.resolve()),
                                progress=not args.quiet, camera=args.camera)
            if main_process:
                print(f"labelled {data} -> {out}")
    except (CheckpointError, LabelError, IngestError) as e:
        raise UserError(str(e)) from None
    return 0
