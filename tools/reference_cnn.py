"""A reference policy for the simulated tasks: how well can a plain CNN, told the task and the target
in one-hot form (no language), generalise to layouts it never saw? It bounds what the VLAs here can
be expected to reach on the same data, and it is where architecture and data questions are cheap
to measure (minutes on 2 cores). docs/lab-notes/reference-cnn.md reports its numbers.

    # expert episodes of every task, frames and commanded moves in one .npz (no bags, no ROS)
    .venv/bin/python tools/reference_cnn.py generate /tmp/ref/train.npz --layouts 1000 --first-seed 0
    .venv/bin/python tools/reference_cnn.py generate /tmp/ref/test.npz --layouts 40 --first-seed 900000
    # train on the first N layouts of each task, score held-out layouts
    .venv/bin/python tools/reference_cnn.py train /tmp/ref/train.npz /tmp/ref/test.npz --arch film_ssm --steps 8000
    # the same with the VLA's kind of head: 256 equal-frequency bins, + the expected-move loss
    .venv/bin/python tools/reference_cnn.py train /tmp/ref/train.npz /tmp/ref/test.npz --head bins --expectation-loss 1

Heads (``--head``): ``mse`` regresses the move, normalised per axis; ``bins`` classifies each axis
into ``--bins`` equal-frequency bins with cross-entropy, as the VLA's action head does, optionally
with Gaussian soft labels (``--label-sigma``, in bins), two-hot labels (``--two-hot``) or the VLA's
``expectation_loss`` (``--expectation-loss W``: + W x squared error of the expected move). A bins
head is scored with argmax and with expectation decoding.

Architectures: ``pool`` (convs with coordinate planes, global average pool, the one-hot condition
joined at the MLP), ``film`` (the condition scales and shifts every conv layer), ``ssm`` (spatial
softmax keypoints instead of the pool), and ``film_ssm``. Scores are the same as ``lapa eval
actions``: cosine between predicted and expert horizontal motion on frames that moved at least
3 mm, per episode, over all frames and over each episode's first 5 frames.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

TASK_NAMES = ("reach", "push", "pick_place")
DIRECTION_NAMES = ("", "left", "right", "forward", "backward")
FIRST_STEPS, MIN_MOTION, PERIOD = 5, 0.003, 0.1

_env = None


def _init_worker(size: int) -> None:
    global _env
    from lapa_sim.env import TabletopEnv

    _env = TabletopEnv(image_size=(size, size))


def _episode(job: tuple[str, int]) -> dict:
    from lapa_sim import tasks
    from lapa_sim.expert import ScriptedExpert

    task, seed = job
    obs = _env.reset(task, seed, "train")
    ep = _env.episode
    expert = ScriptedExpert(ep, noise=0.03, seed=seed)
    frames, moves = [], []
    for _ in range(int(round(tasks.MAX_SECONDS[task] / PERIOD))):
        if obs.success:
            break
        frames.append(_env.render("front"))
        twist, gripper = expert.act(obs)
        moves.append([*(twist[:3] * PERIOD), gripper])  # m per step, opening
        obs = _env.step(twist, gripper, PERIOD)
    return dict(task=task, seed=seed, frames=np.stack(frames), moves=np.array(moves, np.float32),
                color=ep.color, pad=ep.pad_color, direction=ep.direction)


def generate(out: str, layouts: int, first_seed: int, size: int, workers: int) -> None:
    from tqdm import tqdm

    jobs = [(t, s) for s in range(first_seed, first_seed + layouts) for t in TASK_NAMES]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(size,)) as pool:
        eps = list(tqdm(pool.imap(_episode, jobs, chunksize=4), total=len(jobs), desc="episodes", mininterval=10))
    np.savez(out, frames=np.concatenate([e["frames"] for e in eps]), moves=np.concatenate([e["moves"] for e in eps]),
             lengths=np.array([len(e["moves"]) for e in eps]),
             **{k: np.array([e[k] for e in eps]) for k in ("task", "seed", "color", "pad", "direction")})
    print(f"{len(eps)} episodes, {sum(len(e['moves']) for e in eps)} frames -> {out}")


class _Episodes:
    def __init__(self, path: str, layouts: int | None = None):
        d = np.load(path)
        self.d = d
        self.lengths = d["lengths"]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        keep = np.arange(len(self.lengths))
        if layouts:
            keep = keep[np.isin(d["seed"], np.unique(d["seed"])[:layouts])]
        self.keep = keep

    def condition(self, e: int, colors: list[str]) -> np.ndarray:
        d, n = self.d, len(colors)
        v = np.zeros(3 + 2 * n + len(DIRECTION_NAMES), np.float32)
        v[TASK_NAMES.index(d["task"][e])] = 1
        v[3 + colors.index(d["color"][e])] = 1
        if d["task"][e] == "pick_place":
            v[3 + n + colors.index(d["pad"][e])] = 1
        v[3 + 2 * n + DIRECTION_NAMES.index(str(d["direction"][e]))] = 1
        return v

    def frame_slice(self, e: int) -> slice:
        return slice(self.starts[e], self.starts[e] + self.lengths[e])


def _net(n_cond: int, arch: str, outputs: int, channels=(32, 64, 64, 64)):
    import torch
    from torch import nn
    import torch.nn.functional as F

    def grid(h: int, w: int) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return torch.stack([xs, ys])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            c = [5, *channels]  # RGB + x/y coordinate planes
            self.convs = nn.ModuleList([nn.Conv2d(c[i], c[i + 1], 5 if i == 0 else 3, stride=2 if i < 3 else 1,
                                                  padding=2 if i == 0 else 1) for i in range(4)])
            self.film = nn.ModuleList([nn.Linear(n_cond, 2 * c[i + 1]) for i in range(4)]) if "film" in arch else None
            feat = 2 * channels[-1] if "ssm" in arch else channels[-1]
            self.head = nn.Sequential(nn.Linear(feat + n_cond, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                      nn.Linear(256, outputs))

        def forward(self, img, cond):
            b, _, h, w = img.shape
            x = torch.cat([img, grid(h, w).expand(b, 2, h, w)], 1)
            for i, conv in enumerate(self.convs):
                x = conv(x)
                if self.film is not None:
                    scale, shift = self.film[i](cond).chunk(2, -1)
                    x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
                if i < 3:
                    x = F.gelu(x)
            if "ssm" in arch:  # each channel's softmax over positions -> its expected (x, y)
                att = x.flatten(2).softmax(-1)
                g = grid(*x.shape[2:]).flatten(1)
                f = torch.cat([(att * g[0]).sum(-1), (att * g[1]).sum(-1)], -1)
            else:
                f = x.mean((2, 3))
            return self.head(torch.cat([f, cond], -1))

    return Net()


class _Bins:
    """Equal-frequency bins per axis of the moves (N, 3), each decoded to its median."""

    def __init__(self, moves: np.ndarray, n: int):
        import torch

        self.n = n
        self.edges = [np.quantile(moves[:, k], np.arange(1, n) / n) for k in range(3)]
        ids = self.encode_np(moves)
        values = np.zeros((3, n))
        for k in range(3):
            for j in np.unique(ids[:, k]):
                values[k, j] = np.median(moves[ids[:, k] == j, k])
        self.values = torch.from_numpy(values).float()  # (3, n)

    def encode_np(self, moves: np.ndarray) -> np.ndarray:
        return np.stack([np.searchsorted(self.edges[k], moves[:, k], side="right") for k in range(3)], 1)

    def targets(self, moves, sigma: float, two_hot: bool):
        """(B, 3) moves -> (B, 3, n) target distributions (one-hot, Gaussian or two-hot)."""
        import torch

        ids = torch.from_numpy(self.encode_np(moves.numpy()))
        if two_hot:  # the two bin values around the move, weighted so their mean is the move
            hi = torch.stack([torch.searchsorted(self.values[k].contiguous(), moves[:, k].contiguous())
                              for k in range(3)], 1).clamp(1, self.n - 1)
            v = self.values.expand(len(moves), 3, self.n)
            lo_v, hi_v = v.gather(2, (hi - 1)[..., None])[..., 0], v.gather(2, hi[..., None])[..., 0]
            w = ((moves - lo_v) / (hi_v - lo_v).clamp(min=1e-9)).clamp(0, 1)
            q = torch.zeros(len(moves), 3, self.n)
            q.scatter_(2, (hi - 1)[..., None], (1 - w)[..., None])
            return q.scatter_add_(2, hi[..., None], w[..., None])
        j = torch.arange(self.n).float()
        if sigma:
            q = torch.exp(-0.5 * ((j - ids[..., None].float()) / sigma) ** 2)
            return q / q.sum(-1, keepdim=True)
        return torch.nn.functional.one_hot(ids, self.n).float()

    def decode(self, logits, mode: str):
        """(B, 3, n) logits -> (B, 3) moves: the argmax bin's value, or the expected value."""
        if mode == "expectation":
            return (logits.softmax(-1) * self.values).sum(-1)
        return self.values.expand(len(logits), 3, self.n).gather(2, logits.argmax(-1, keepdim=True))[..., 0]


def train(train_path: str, test_path: str, arch: str, steps: int, layouts: int | None, shift: int,
          seed: int, threads: int, head: str = "mse", num_bins: int = 256, label_sigma: float = 0.0,
          two_hot: bool = False, expectation_loss: float = 0.0) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tr, te = _Episodes(train_path, layouts), _Episodes(test_path)
    colors = sorted({*tr.d["color"], *tr.d["pad"], *te.d["color"], *te.d["pad"]})
    rows = np.concatenate([np.arange(tr.starts[e], tr.starts[e] + tr.lengths[e]) for e in tr.keep])
    owner = np.concatenate([np.full(tr.lengths[e], e) for e in tr.keep])
    frames = torch.from_numpy(tr.d["frames"][rows]).permute(0, 3, 1, 2).contiguous()
    moves = torch.from_numpy(tr.d["moves"][rows])
    conds = torch.from_numpy(np.stack([tr.condition(e, colors) for e in owner]))
    scale = moves[:, :3].std(0)
    bins = _Bins(moves[:, :3].numpy(), num_bins) if head == "bins" else None
    net = _net(conds.shape[1], arch, 4 + (3 * num_bins if bins else 0))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(frames), (64,))
        img = frames[idx].float() / 255
        if shift:  # random shifts of up to `shift` px, each image its own
            padded = F.pad(img, (shift,) * 4, mode="replicate")
            off = np.random.randint(0, 2 * shift + 1, (len(img), 2))
            img = torch.stack([padded[i, :, y:y + img.shape[2], x:x + img.shape[3]] for i, (x, y) in enumerate(off)])
        out = net(img, conds[idx])
        loss = F.binary_cross_entropy_with_logits(out[:, 3], moves[idx, 3])
        if bins is None:
            loss = loss + F.mse_loss(out[:, :3], moves[idx, :3] / scale)
        else:
            logits = out[:, 4:].reshape(-1, 3, num_bins)
            q = bins.targets(moves[idx, :3], label_sigma, two_hot)
            loss = loss - (q * logits.log_softmax(-1)).sum(-1).mean()
            if expectation_loss:
                loss = loss + expectation_loss * F.mse_loss(bins.decode(logits, "expectation") / scale,
                                                            moves[idx, :3] / scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()

    def predict(img, cond, mode: str) -> np.ndarray:
        out = net(img, cond)
        if bins is None:
            return (out[:, :2] * scale[:2]).numpy()
        return bins.decode(out[:, 4:].reshape(-1, 3, num_bins), mode)[:, :2].numpy()

    def score(eps: _Episodes, which, mode: str = "argmax") -> tuple[float, float, float, float]:
        every, first = [], []
        with torch.no_grad():
            for e in which:
                sl = eps.frame_slice(e)
                img = torch.from_numpy(eps.d["frames"][sl]).permute(0, 3, 1, 2).float() / 255
                cond = torch.from_numpy(np.tile(eps.condition(e, colors), (eps.lengths[e], 1)))
                pred = predict(img, cond, mode)
                true = eps.d["moves"][sl][:, :2]
                moved = np.linalg.norm(true, axis=1) >= MIN_MOTION
                cos = (pred * true).sum(1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1) + 1e-9)
                if moved.any():
                    every.append(cos[moved].mean())
                if moved[:FIRST_STEPS].any():
                    first.append(cos[:FIRST_STEPS][moved[:FIRST_STEPS]].mean())
        se = lambda v: np.std(v) / np.sqrt(len(v))  # noqa: E731
        return np.mean(every), se(every), np.mean(first), se(first)

    what = head if bins is None else (f"{num_bins} bins" + (f", label sigma {label_sigma}" if label_sigma else "")
                                      + (", two-hot" if two_hot else "")
                                      + (f", expectation loss {expectation_loss}" if expectation_loss else ""))
    for mode in (("argmax", "expectation") if bins else ("mse",)):
        a = score(tr, tr.keep[:60], mode)
        b = score(te, te.keep, mode)
        print(f"arch {arch}, head {what}, decoding {mode}, shift {shift}, "
              f"{len(np.unique(tr.d['seed'][tr.keep]))} layouts, {steps} steps: "
              f"training layouts cos(xy) {a[0]:.2f} first steps {a[2]:.2f} | held-out layouts cos(xy) "
              f"{b[0]:.2f} ± {b[1]:.2f} first steps {b[2]:.2f} ± {b[3]:.2f} ({time.time() - t0:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="job", required=True)
    g = sub.add_parser("generate", help="expert episodes of every task into one .npz")
    g.add_argument("out")
    g.add_argument("--layouts", type=int, default=1000, help="seeds per task")
    g.add_argument("--first-seed", type=int, default=0)
    g.add_argument("--image-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=2)
    t = sub.add_parser("train", help="train on one .npz, score held-out layouts from another")
    t.add_argument("train")
    t.add_argument("test")
    t.add_argument("--arch", choices=("pool", "film", "ssm", "film_ssm"), default="film_ssm")
    t.add_argument("--steps", type=int, default=8000)
    t.add_argument("--layouts", type=int, default=0, help="train on the first N layouts of each task (0: all)")
    t.add_argument("--shift", type=int, default=0, help="random-shift augmentation in px (0: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--head", choices=("mse", "bins"), default="mse", help="regression, or bins as the VLA's head")
    t.add_argument("--bins", type=int, default=256, help="equal-frequency bins per axis (--head bins)")
    t.add_argument("--label-sigma", type=float, default=0.0, help="Gaussian soft labels, in bins (0: one-hot)")
    t.add_argument("--two-hot", action="store_true", help="two-hot labels around the move")
    t.add_argument("--expectation-loss", type=float, default=0.0,
                   help="weight of the expected move's squared error next to the cross-entropy")
    a = p.parse_args()
    if a.job == "generate":
        generate(a.out, a.layouts, a.first_seed, a.image_size, a.workers)
    else:
        if a.head == "bins" and a.bins < 2:
            p.error("--bins must be >= 2")
        train(a.train, a.test, a.arch, a.steps, a.layouts or None, a.shift, a.seed, a.threads, a.head, a.bins,
              a.label_sigma, a.two_hot, a.expectation_loss)


if __name__ == "__main__":
    main()
