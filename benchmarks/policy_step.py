"""VLA policy speed: ``policy.act`` latency end to end (image in, 7-D delta out), p50/p99 and Hz.

    .venv/bin/python benchmarks/policy_step.py [--checkpoint DIR] [--threads 2] [--steps 300]
                                                [--image-size 64] [--camera 480x640] [--chunk-size 1]
                                                [--train-steps 60] [--batch 32]
    .venv/bin/python benchmarks/policy_step.py --preset smolvlm-500m [--device cuda --dtype bf16]
                                                [--chunk-size 8] [--steps 50] [--camera 480x640]

--preset NAME builds a random-weight VLM of that preset's full size (benchmarks/vlm_architectures/
NAME.json: the hub config's sizes, its image processor, its prompt format; a byte-level tokenizer, so
an instruction is a few dozen more tokens than with the real one) and times ``act`` on it, with the
effective control rate when one inference gives chunk-size steps. No download.

Second half: samples/s of `lapa train finetune` against a minimal hand-written PyTorch loop on the
same tiny model and batch size (goal: within 10 %).

Without --checkpoint it builds the tiny preset (random weights, fitted bins on random actions),
saves it, and loads it back through ``lapa_core.policy.load_policy`` like the policy server does, so the
number includes preprocessing, the cached instruction tokens, the model and bin decoding. --camera
feeds frames of that size (resized/cropped inside act) instead of frames already at the model size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def tiny_checkpoint(directory: Path, image_size: int, chunk_size: int) -> Path:
    from lapa_training.vla import ActionBins, VLAConfig, VLAModel

    torch.manual_seed(0)
    model = VLAModel(VLAConfig.tiny(image_size=image_size, objective="latent", stage="finetune",
                                    chunk_size=chunk_size))
    model.set_action_bins(ActionBins.fit(np.random.default_rng(0).normal(size=(5000, 7)) * 0.01))
    print(f"tiny VLA: {model.num_parameters() / 1e6:.2f} M parameters {model.parameter_counts()}")
    return model.save_pretrained(directory / "tiny_vla")


ARCHITECTURES = Path(__file__).parent / "vlm_architectures"


def preset_policy(name: str, chunk_size: int, device: str, dtype: torch.dtype):
    """A VLAPolicy on a random-weight VLM of the preset's full size (see the module doc)."""
    import json

    import transformers
    from transformers import AutoConfig, AutoModel

    from lapa_training.run_config import load_run_config
    from lapa_training.vla import ActionBins, VLAConfig, VLAModel
    from lapa_training.vla.backbones import byte_tokenizer
    from lapa_training.vla.policy import VLAPolicy
    from lapa_training.vla.image_only_processors import qwen_processor_for_images, smolvlm_processor_for_images
    from lapa_training.vla.vlm_backbone import VLMBackbone

    spec = json.loads((ARCHITECTURES / f"{name}.json").read_text())
    preset = load_run_config(Path(__file__).parents[1] / "config" / "train" / "presets" / f"{name}.yaml")["model"]
    tok = byte_tokenizer(tuple(spec["special_tokens"]), **spec["roles"])
    image_kwargs = dict(spec["image_processor"])
    seq_length = image_kwargs.pop("image_seq_length", None)
    images = getattr(transformers, image_kwargs.pop("class"))(**image_kwargs)
    kind = spec["processor"]["class"]
    if kind == "image_only_qwen":
        processor = qwen_processor_for_images(images, tok, spec["chat_template"])
    elif kind == "image_only_smolvlm":
        processor = smolvlm_processor_for_images(images, tok, spec["chat_template"], spec["processor"]["image_seq_len"])
    elif kind == "PaliGemmaProcessor":
        images.image_seq_length = seq_length
        processor = transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds its own tokens
    else:
        processor = getattr(transformers, kind)(image_processor=images, tokenizer=tok,
                                                image_seq_len=spec["processor"]["image_seq_len"],
                                                chat_template=spec["chat_template"])
    config = dict(spec["config"])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in
           (("image_token_id", spec["image_token"]), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>")) if v in tok.get_vocab()}
    model_config = AutoConfig.for_model(config.pop("model_type"), **config, **ids)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModel.from_config(model_config, dtype=torch.float32)
    vlm = VLMBackbone(model, processor, f"random {name}")
    cfg = VLAConfig.vlm(**{k: v for k, v in preset.items() if k not in ("preset", "processor_overrides", "lora_rank",
                                                                        "lora_alpha")},
                        stage="finetune", objective="action", chunk_size=chunk_size)
    vla = VLAModel(cfg, vlm=vlm, action_bins=ActionBins.fit(np.random.default_rng(0).normal(size=(5000, 7)) * 0.01))
    vla.to(device)
    vla.vlm.to(dtype)  # the heads stay float32: they read the final state cast to their dtype
    counts = vla.parameter_counts()
    print(f"{name}: random {spec['config']['model_type']} of {sum(counts.values()) / 1e9:.2f} B parameters "
          f"({', '.join(f'{k} {v / 1e6:.0f} M' for k, v in counts.items())}), built in {time.perf_counter() - t0:.0f} s; "
          f"{device}, {str(dtype).replace('torch.', '')}")
    return VLAPolicy(vla, source=name)


def policy_latency(args) -> None:
    from lapa_core.policy import load_policy

    if args.preset:
        policy = preset_policy(args.preset, args.chunk_size, args.device,
                               {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tmp), args.image_size,
                                                                                  args.chunk_size)
            policy = load_policy(path)
    h, w = (int(v) for v in args.camera.split("x")) if args.camera else (args.image_size, args.image_size)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(8, h, w, 3), dtype=np.uint8)
    instruction = "pick up the red block and place it on the green target"
    policy.reset(instruction)
    for i in range(args.warmup):
        policy.act(frames[i % len(frames)], instruction)
    times, inferred = [], []
    for i in range(args.steps):
        queued = len(policy._queue)
        t0 = time.perf_counter()
        step = policy.act(frames[i % len(frames)], instruction)
        times.append(time.perf_counter() - t0)
        inferred.append(queued == 0)  # this call ran the model (with chunking, most calls pop the queue)
    assert step.delta.shape == (7,) and np.isfinite(step.delta).all()
    ms = np.asarray(times) * 1e3
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    print(f"policy.act {h}x{w} frames, {torch.get_num_threads()} threads, chunk {policy.chunk_size}: "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {ms.mean():.2f} ms -> {1e3 / p50:.3g} Hz at p50, "
          f"{1e3 / p99:.3g} Hz at p99, {1e3 / ms.mean():.3g} Hz sustained")
    if policy.chunk_size > 1:
        inf = ms[np.asarray(inferred)]
        print(f"  calls that ran the model ({len(inf)} of {len(ms)}): p50 {np.percentile(inf, 50):.2f} ms, "
              f"p99 {np.percentile(inf, 99):.2f} ms -> effective control rate with chunks of {policy.chunk_size}: "
              f"{policy.chunk_size * 1e3 / np.percentile(inf, 50):.1f} Hz at p50, "
              f"{policy.chunk_size * 1e3 / np.percentile(inf, 99):.1f} Hz at p99")


# ---------------------------------------------------------------------------------------------
# VLA training throughput: `lapa train finetune` vs a minimal hand-written PyTorch loop
# ---------------------------------------------------------------------------------------------
def training_throughput(args) -> None:
    """samples/s of the trainer (data order, frame gathering, tokenising, bins, AdamW, clipping,
    logging) against a bare loop doing forward + backward + AdamW on one fixed, pre-gathered batch
    of the same tiny model. Augmentation is off in both; validation and saving fall outside the
    timed window."""
    from lapa_training.data.generate import generate
    from lapa_training.data.ingest import IngestOptions, ingest
    from lapa_training.vla import ActionBins, VLAConfig, VLAModel
    from lapa_training.vla.train_vla import action_samples, finetune

    steps, warm, batch = args.train_steps, 5, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "bags", ["reach", "push"], 2, image_size=args.image_size, progress=False)
        ingest([tmp / "bags"], tmp / "data", IngestOptions(image_size=args.image_size, split=(1.0, 0.0, 0.0),
                                                           progress=False, warn=lambda m: None))
        marks = {}

        def clock(step, record):
            if step in (warm, steps):
                marks[step] = time.perf_counter()

        train = {"steps": steps, "batch_size": batch, "val_every": 10 * steps, "save_every": 10 * steps,
                 "log_every": steps}
        finetune([tmp / "data"], tmp / "run", {"image_size": args.image_size}, train, {"augment": False},
                 progress=False, callbacks=[clock])
        lapa_rate = (steps - warm) * batch / (marks[steps] - marks[warm])

        from lapa_training.data.dataset import Dataset

        ds = Dataset(tmp / "data")
        samples = action_samples([ds], "train", 1)
        torch.manual_seed(0)
        model = VLAModel(VLAConfig.tiny(image_size=args.image_size, stage="finetune", objective="action"))
        model.set_action_bins(ActionBins.fit(samples.targets.reshape(-1, 7), model.config.num_bins))
        model.train()
        rows = np.random.default_rng(0).choice(len(samples), size=batch, replace=len(samples) < batch)  # a typical mix
        images = torch.from_numpy(np.asarray(ds.frames)[samples.index[rows]])
        instructions = [ds.episodes[int(ds.episode_index[i])]["instruction"] for i in samples.index[rows]]
        targets = samples.targets[rows]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)

        def bare_step():
            pixels = model.preprocess_images(images)
            ids, mask = model.tokenize(instructions)
            out = model(pixels, ids, mask, labels=model.encode_actions(targets))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warm):
            bare_step()
        t0 = time.perf_counter()
        for _ in range(steps - warm):
            bare_step()
        bare_rate = (steps - warm) * batch / (time.perf_counter() - t0)
    print(f"training, tiny VLA finetune, batch {batch}, {steps - warm} timed steps:")
    print(f"  minimal PyTorch loop   {bare_rate:8.1f} samples/s")
    print(f"  lapa train finetune    {lapa_rate:8.1f} samples/s   ratio {lapa_rate / bare_rate:.2f}  (goal >= 0.9)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a finetuned VLA checkpoint (default: tiny preset)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--steps", type=int, default=300, help="timed act() calls")
    ap.add_argument("--image-size", type=int, default=64, help="tiny preset image size")
    ap.add_argument("--camera", default=None, help="HxW of the frames fed to act (default: the model size)")
    ap.add_argument("--chunk-size", type=int, default=1, help="tiny preset action chunk size")
    ap.add_argument("--train-steps", type=int, default=60, help="training steps timed (0: skip the training half)")
    ap.add_argument("--batch", type=int, default=32, help="training batch size")
    ap.add_argument("--preset", choices=sorted(p.stem for p in ARCHITECTURES.glob("*.json")),
                    help="a VLM preset of config/train/presets/ at full size, random weights "
                         "(benchmarks/vlm_architectures/); skips the training half")
    ap.add_argument("--device", default="cpu", help="--preset: torch device (default cpu)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="--preset: the VLM's dtype")
    ap.add_argument("--warmup", type=int, default=20, help="untimed act() calls first (default 20)")
    args = ap.parse_args()
    if args.preset and args.checkpoint:
        ap.error("--preset builds its own model: give --preset or --checkpoint, not both")
    if args.preset:
        args.train_steps = 0
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    policy_latency(args)
    if args.train_steps:
        training_throughput(args)


if __name__ == "__main__":
    main()
