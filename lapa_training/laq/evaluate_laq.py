"""Diagnostics of a trained LAQ model on a dataset: ``lapa eval laq``.

    report = evaluate_laq(model, Dataset("runs/data/sim"), "runs/eval/laq", split="val")

writes into the output directory

    report.json          every number below
    report.md            a short human-readable summary, linking the images
    codebook_usage.png   code histogram of every token position
    probe.png            R² per action dimension, real tokens vs the shuffled-token control
    token_grid.png       scenes x latent-action token sequences, decoded x_{t+H}
    token_grid_diff.png  the same grid as decoded - x_t (what each token sequence changes)
    recon_examples.png   a few evaluated pairs: x_t, x_{t+H}, reconstruction, errors

Sections (all on the pairs (x_t, x_{t+H}) of `split`, at most `max_pairs` of them, a seeded random
subset; images in the model's [-1, 1] scale):

- **reconstruction**: MSE of decode(x_t, encode(x_t, x_{t+H})) against x_{t+H} (eval mode, no
  quantizer noise, the raw unclamped output as in the training loss) vs the copy baseline
  "x_{t+H} = x_t"; their ratio, PSNR (peak-to-peak 2), the fraction of pairs the model beats the
  copy on, and the MSE when every pair is decoded with another pair's tokens (if that is no worse
  than with its own tokens, the decoder ignores the latent action).
- **codebook**: per token position, the fraction of the codebook used, the perplexity of the code
  histogram, the histogram itself; the number of distinct token sequences.
- **probe**: how much of the ground-truth action the tokens carry. Target: the action summed over
  the window (rows i .. i+H-1 of actions.npy, all 7 dimensions; pairs with any NaN are left out).
  Features: one-hot of the L tokens (L x |C|). Fit on `probe_split`, scored on `split`: R² per
  dimension of a ridge probe (closed form) and a small MLP probe, and sign accuracy of dx, dy, dz
  where the true summed translation exceeds SIGN_THRESHOLD_M. Control: the same probes on the real
  tokens shuffled across pairs (same token statistics, no link to the pair).
- **token grid**: the paper's figure, plus a number for it: the cosine similarity of the change
  images (decoded - x_t) of one token sequence across different scenes vs of different sequences
  across different scenes.

Bad input raises LAQEvalError (a ValueError) with a message saying what to do.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lapa_training.laq.modeling_laq import LAQModel, frames_to_input, output_to_uint8

REPORT_FORMAT = "lapa-laq-eval"
REPORT_VERSION = 1
MIN_EVAL_PAIRS = 8  # fewer pairs in the evaluated split is an error
MIN_PROBE_FIT_PAIRS = 20  # fewer action-labelled pairs in the probe split skips the probe
MIN_PROBE_EVAL_PAIRS = 5  # ... and in the evaluated split
SIGN_DIMS = ("dx", "dy", "dz")
SIGN_THRESHOLD_M = 0.005  # sign accuracy counts only pairs whose |summed translation| exceeds this [m]
RIDGE_LAMBDA = 1.0  # in units of one-hot counts (each feature column is a count of pairs)
MLP_HIDDEN, MLP_STEPS, MLP_LR, MLP_WEIGHT_DECAY = 128, 300, 3e-3, 1e-4
FILES = {"json": "report.json", "markdown": "report.md", "codebook": "codebook_usage.png", "probe": "probe.png",
         "grid": "token_grid.png", "grid_diff": "token_grid_diff.png", "examples": "recon_examples.png"}


class LAQEvalError(ValueError):
    """The model and dataset cannot be evaluated together as asked (size mismatch, too few pairs, ...)."""


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------
def evaluate_laq(model: LAQModel, dataset, out_dir: str | Path, *, split: str = "val", probe_split: str = "train",
                 max_pairs: int = 2000, batch_size: int = 64, seed: int = 0, progress: bool = True,
                 grid_scenes: int = 5, grid_tokens: int = 5, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `model` on `dataset` (a Dataset or its path), write the report files into `out_dir`
    and return the report (what report.json holds). `info` (e.g. the checkpoint path) is copied into
    the report. The model is used in eval mode and put back into the mode it was in."""
    from lapa_training.data.dataset import SPLITS, Dataset

    started = time.monotonic()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    for name, s in (("split", split), ("probe_split", probe_split)):
        if s not in SPLITS:
            raise LAQEvalError(f"unknown {name} '{s}'; use one of {', '.join(SPLITS)}")
    if max_pairs < MIN_EVAL_PAIRS:
        raise LAQEvalError(f"max_pairs must be at least {MIN_EVAL_PAIRS}, not {max_pairs}")
    if batch_size < 1:
        raise LAQEvalError(f"batch_size must be at least 1, not {batch_size}")
    cfg = model.config
    check_frame_size(ds, cfg.image_size, cfg.channels)

    all_pairs = ds.pairs(split)
    if len(all_pairs) < MIN_EVAL_PAIRS:
        counts = ", ".join(f"{s} {len(ds.pairs(s))}" for s in SPLITS)
        raise LAQEvalError(f"split '{split}' of {ds.root} has {len(all_pairs)} frame pairs (need at least "
                           f"{MIN_EVAL_PAIRS}); pairs per split: {counts}. Evaluate another split (--split) or "
                           f"give the dataset more episodes in '{split}'")
    rng = np.random.default_rng(seed)
    pairs = _subset(all_pairs, max_pairs, rng)  # random order: neighbours in a batch are unrelated pairs
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LAQEvalError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        rec = _reconstruction_pass(model, ds, pairs, batch_size, device, progress)
        tokens = rec.pop("tokens")
        codebook = codebook_stats(tokens, cfg.codebook_size)
        probe = _probe_section(model, ds, split, probe_split, pairs, tokens, max_pairs, batch_size, seed, device,
                               progress)
        grid = _token_grid(model, ds, pairs, tokens, grid_scenes, grid_tokens, rng, device)
        examples = _examples(model, ds, pairs, tokens, rng, device)
    finally:
        model.train(was_training)

    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"info": dict(info)} if info else {}),
        "dataset": _dataset_info(ds, split, probe_split, all_pairs, pairs),
        "model": {"image_size": list(cfg.image_size), "num_tokens": cfg.num_tokens,
                  "codebook_size": cfg.codebook_size, "window_s": cfg.window_s,
                  "parameters": model.num_parameters(), "device": str(device)},
        "settings": {"split": split, "probe_split": probe_split, "max_pairs": max_pairs, "batch_size": batch_size,
                     "seed": seed},
        "reconstruction": rec, "codebook": codebook, "probe": probe,
        "token_grid": {k: v for k, v in grid.items() if not k.startswith("_")},
        "files": dict(FILES),
    }
    report["warnings"] = _warnings(report)
    _plot_codebook(out / FILES["codebook"], codebook)
    _plot_probe(out / FILES["probe"], probe, ds.action_names)
    _plot_grid(out / FILES["grid"], out / FILES["grid_diff"], grid)
    _plot_examples(out / FILES["examples"], examples)
    report["elapsed_s"] = round(time.monotonic() - started, 2)
    (out / FILES["json"]).write_text(json.dumps(report, indent=2) + "\n")
    (out / FILES["markdown"]).write_text(format_markdown(report))
    return report


def check_frame_size(ds, image_size: tuple[int, int], channels: int = 3) -> None:
    """LAQEvalError unless the dataset's frames are (H, W, channels) = the model's image size."""
    shape = tuple(ds.frames.shape[1:])
    h, w = image_size
    if shape != (h, w, channels):
        fh, fw = shape[:2] if len(shape) >= 2 else (0, 0)
        reingest = f"re-ingest the data at the model's size (lapa data ingest ... --image-size {h}) or " if h == w \
            else ""
        raise LAQEvalError(f"dataset {ds.root} has {fw}x{fh} frames but the model takes {w}x{h} images; "
                           f"{reingest}train a model at {fw}x{fh}")


def _subset(pairs: np.ndarray, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """At most max_pairs rows of pairs, a seeded random subset in random order."""
    order = rng.permutation(len(pairs))[:max_pairs]
    return pairs[order]


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _frames(ds, index: np.ndarray, device) -> torch.Tensor:
    return frames_to_input(np.asarray(ds.frames[np.asarray(index)]), device)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair", disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------
# reconstruction vs copying x_t
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _reconstruction_pass(model, ds, pairs, batch_size, device, progress) -> dict[str, Any]:
    n = len(pairs)
    mse, copy, shuffled = np.zeros(n), np.zeros(n), np.full(n, np.nan)
    tokens = np.zeros((n, model.config.num_tokens), dtype=np.int64)
    with _progress(n, f"LAQ eval: reconstruct {n} pairs", progress) as bar:
        for sl in _batches(n, batch_size):
            x_t, x_next = _frames(ds, pairs[sl, 0], device), _frames(ds, pairs[sl, 1], device)
            tok = model.encode(x_t, x_next)
            recon = model.decode(x_t, tok).float()
            mse[sl] = (recon - x_next).pow(2).flatten(1).mean(1).cpu().numpy()
            copy[sl] = (x_t - x_next).pow(2).flatten(1).mean(1).cpu().numpy()
            if len(tok) > 1:  # each pair decoded with its batch neighbour's tokens (pairs are in random order)
                other = model.decode(x_t, tok.roll(1, 0)).float()
                shuffled[sl] = (other - x_next).pow(2).flatten(1).mean(1).cpu().numpy()
            tokens[sl] = tok.cpu().numpy()
            bar.update(len(tok))
    m, c = float(mse.mean()), float(copy.mean())
    done = np.isfinite(shuffled)
    return {
        "pairs": n, "mse": m, "copy_mse": c, "ratio": m / c if c > 0 else None, "beats_copy": bool(m < c),
        "psnr_db": psnr(m), "copy_psnr_db": psnr(c), "win_rate": float((mse < copy).mean()),
        "shuffled_tokens_mse": float(shuffled[done].mean()) if done.any() else None,
        "tokens": tokens,
    }


def psnr(mse: float, peak_to_peak: float = 2.0) -> float | None:
    """PSNR [dB] of an MSE of images in a range peak_to_peak wide ([-1, 1]: 2)."""
    return float(10 * math.log10(peak_to_peak ** 2 / mse)) if mse > 0 else None


# ---------------------------------------------------------------------------------------------
# codebook use
# ---------------------------------------------------------------------------------------------
def codebook_stats(tokens: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """Per token position: code histogram, fraction of the codebook used, perplexity (exp entropy)."""
    def stats(counts: np.ndarray) -> dict[str, Any]:
        p = counts / max(counts.sum(), 1)
        nz = p[p > 0]
        return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
                "perplexity": float(np.exp(-(nz * np.log(nz)).sum())), "counts": counts.astype(int).tolist()}

    tokens = np.asarray(tokens)
    per_position = [stats(np.bincount(tokens[:, j], minlength=codebook_size)) for j in range(tokens.shape[1])]
    distinct = len(np.unique(tokens, axis=0)) if len(tokens) else 0
    return {"codebook_size": codebook_size, "num_tokens": int(tokens.shape[1]), "pairs": int(len(tokens)),
            "per_position": per_position,
            "all_positions": stats(np.bincount(tokens.ravel(), minlength=codebook_size)),
            "distinct_sequences": int(distinct),
            "possible_sequences": int(codebook_size ** tokens.shape[1])
            if tokens.shape[1] * math.log2(codebook_size) < 53 else None}


# ---------------------------------------------------------------------------------------------
# probes from tokens to ground-truth actions
# ---------------------------------------------------------------------------------------------
def window_action_sums(ds, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed actions over each pair's window (rows i .. j-1), (M, 7) float64, and a mask of the
    pairs whose window has no NaN."""
    sums = np.full((len(pairs), len(ds.action_names)), np.nan)
    spans = pairs[:, 1] - pairs[:, 0]
    for h in np.unique(spans):
        rows = np.flatnonzero(spans == h)
        a = np.asarray(ds.actions[pairs[rows, 0][:, None] + np.arange(h)], dtype=np.float64)  # (m, h, 7)
        sums[rows] = a.sum(1)
    return sums, np.isfinite(sums).all(1)


def one_hot(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    """(M, L) tokens -> (M, L * codebook_size) float64 one-hot features."""
    m, l = tokens.shape
    x = np.zeros((m, l * codebook_size))
    x[np.arange(m)[:, None], np.arange(l) * codebook_size + tokens] = 1.0
    return x


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float = RIDGE_LAMBDA):
    """Closed-form ridge regression with an unpenalised intercept -> predict(x)."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
    return lambda q: (q - mx) @ w + my


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int, steps: int = MLP_STEPS):
    """A 2-hidden-layer ReLU MLP on standardised targets, full-batch AdamW, seeded -> predict(x)."""
    my, sy = y.mean(0), y.std(0)
    sy = np.where(sy > 1e-12, sy, 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], MLP_HIDDEN), torch.nn.ReLU(),
                                  torch.nn.Linear(MLP_HIDDEN, MLP_HIDDEN), torch.nn.ReLU(),
                                  torch.nn.Linear(MLP_HIDDEN, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor((y - my) / sy, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose from threads (100x slower on a busy 2-core machine)
    try:
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(net(xt), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)

    def predict(q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.as_tensor(q, dtype=torch.float32)).double().numpy() * sy + my

    return predict


def r2_scores(y: np.ndarray, pred: np.ndarray) -> list[float | None]:
    """Coefficient of determination per column (1 - SSE / SST around the scored set's mean);
    None for a column that does not vary."""
    sst = ((y - y.mean(0)) ** 2).sum(0)
    sse = ((y - pred) ** 2).sum(0)
    return [float(1 - e / t) if t > 1e-12 * len(y) else None for e, t in zip(sse, sst)]


def sign_accuracy(y: np.ndarray, pred: np.ndarray, threshold: float = SIGN_THRESHOLD_M) -> dict[str, Any]:
    keep = np.abs(y) > threshold
    n = int(keep.sum())
    return {"accuracy": float((np.sign(pred[keep]) == np.sign(y[keep])).mean()) if n else None, "count": n}


def run_probes(fit_tokens, fit_y, eval_tokens, eval_y, codebook_size: int, names, seed: int) -> dict[str, Any]:
    """Ridge and MLP probes from one-hot tokens to summed actions; R² per dimension, sign accuracy of
    the translation dimensions (dx, dy, dz)."""
    x_fit, x_eval = one_hot(fit_tokens, codebook_size), one_hot(eval_tokens, codebook_size)
    result = {}
    for kind, fit in (("ridge", lambda: fit_ridge(x_fit, fit_y)), ("mlp", lambda: fit_mlp(x_fit, fit_y, seed))):
        predict = fit()
        pred = predict(x_eval)
        r2 = r2_scores(eval_y, pred)
        defined = [v for v in r2 if v is not None]
        result[kind] = {"r2": dict(zip(names, r2)), "mean_r2": float(np.mean(defined)) if defined else None,
                        "sign_accuracy": {n: sign_accuracy(eval_y[:, i], pred[:, i])
                                          for i, n in enumerate(names) if n in SIGN_DIMS}}
    return result


def _probe_section(model, ds, split, probe_split, pairs, tokens, max_pairs, batch_size, seed, device,
                   progress) -> dict[str, Any]:
    names = list(ds.action_names)
    base = {"target": "action summed over the window (rows i .. i+H-1), all dimensions; gripper = H x mean closure",
            "features": f"one-hot of the {model.config.num_tokens} tokens "
                        f"({model.config.num_tokens * model.config.codebook_size} dims)",
            "control": "the real tokens shuffled across pairs (fit and scored sets each permuted): the same "
                       "token statistics, no link to the pair", "fit_split": probe_split, "eval_split": split,
            "sign_threshold_m": SIGN_THRESHOLD_M, "ridge_lambda": RIDGE_LAMBDA,
            "mlp": {"hidden": [MLP_HIDDEN, MLP_HIDDEN], "steps": MLP_STEPS, "lr": MLP_LR}}

    def skipped(reason: str) -> dict[str, Any]:
        return {"status": "skipped", "reason": reason, **base}

    if not any(e.get("has_actions") for e in ds.episodes):
        return skipped("no actions: the dataset has no episodes with actions")
    eval_y, eval_ok = window_action_sums(ds, pairs)
    fit_all = ds.pairs(probe_split, require_actions=True)
    rng = np.random.default_rng(seed + 1)
    fit_pairs = _subset(fit_all, max_pairs, rng)
    fit_y, fit_ok = window_action_sums(ds, fit_pairs)
    fit_pairs, fit_y = fit_pairs[fit_ok], fit_y[fit_ok]
    if len(fit_pairs) < MIN_PROBE_FIT_PAIRS:
        return skipped(f"too few pairs with actions to fit on: split '{probe_split}' has {len(fit_pairs)} "
                       f"(need {MIN_PROBE_FIT_PAIRS})")
    if eval_ok.sum() < MIN_PROBE_EVAL_PAIRS:
        return skipped(f"too few pairs with actions to score on: split '{split}' has {int(eval_ok.sum())} of the "
                       f"{len(pairs)} evaluated (need {MIN_PROBE_EVAL_PAIRS})")
    fit_tokens = encode_pairs(model, ds, fit_pairs, batch_size, device, progress, f"LAQ eval: encode {probe_split}")
    eval_tokens, eval_y = tokens[eval_ok], eval_y[eval_ok]
    real = run_probes(fit_tokens, fit_y, eval_tokens, eval_y, model.config.codebook_size, names, seed)
    shuffle = np.random.default_rng(seed + 2)
    control = run_probes(fit_tokens[shuffle.permutation(len(fit_tokens))], fit_y,
                         eval_tokens[shuffle.permutation(len(eval_tokens))], eval_y,
                         model.config.codebook_size, names, seed)
    constant = np.broadcast_to(fit_y.mean(0), eval_y.shape)  # predicting the fit set's mean
    const_r2 = r2_scores(eval_y, constant)
    return {"status": "ok", **base, "fit_pairs": int(len(fit_pairs)), "eval_pairs": int(len(eval_y)),
            "target_std": dict(zip(names, eval_y.std(0).tolist())),
            "constant": {"r2": dict(zip(names, const_r2)),
                         "mean_r2": float(np.mean([v for v in const_r2 if v is not None] or [np.nan])),
                         "sign_accuracy": {n: sign_accuracy(eval_y[:, i], constant[:, i])
                                           for i, n in enumerate(names) if n in SIGN_DIMS}},
            "ridge": {"real": real["ridge"], "control": control["ridge"]},
            "mlp_probe": {"real": real["mlp"], "control": control["mlp"]}}


@torch.no_grad()
def encode_pairs(model, ds, pairs, batch_size, device, progress=False, desc="encode") -> np.ndarray:
    """Tokens (M, L) of frame pairs (M, 2)."""
    out = np.zeros((len(pairs), model.config.num_tokens), dtype=np.int64)
    with _progress(len(pairs), desc, progress) as bar:
        for sl in _batches(len(pairs), batch_size):
            out[sl] = model.encode(_frames(ds, pairs[sl, 0], device), _frames(ds, pairs[sl, 1], device)).cpu().numpy()
            bar.update(sl.stop - sl.start)
    return out


# ---------------------------------------------------------------------------------------------
# the token grid
# ---------------------------------------------------------------------------------------------
def _pick_scenes(ds, pairs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n pair rows whose x_t come from different episodes, tasks taken in turn; from the same
    episodes again (other frames) only when there are fewer episodes than n."""
    episode = np.asarray(ds.episode_index[pairs[:, 0]])
    by_task: dict[str, list[int]] = {}
    for e in sorted(set(episode.tolist())):
        by_task.setdefault(str(ds.episodes[e].get("task") or ""), []).append(e)
    for eps in by_task.values():
        rng.shuffle(eps)
    order = [eps[i] for i in range(max(map(len, by_task.values()))) for eps in by_task.values() if i < len(eps)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(pairs)):
        for e in order:
            rows = [r for r in np.flatnonzero(episode == e) if r not in chosen]
            if rows and len(chosen) < n:
                chosen.append(int(rng.choice(rows)))
    return np.array(chosen, dtype=np.int64)


def most_frequent_sequences(tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most frequent rows of tokens (ties: the smaller sequence first) and their counts."""
    seqs, counts = np.unique(tokens, axis=0, return_counts=True)
    order = np.lexsort((*seqs.T[::-1], -counts))[:k]  # by count desc, then lexicographic
    return seqs[order], counts[order]


def cosine_consistency(diff: np.ndarray) -> dict[str, float | None]:
    """diff (S scenes, K token sequences, P): mean cosine similarity of change images
    - same token, different scenes; - different tokens, different scenes; - same scene, different tokens."""
    s, k = diff.shape[:2]
    v = diff.reshape(s * k, -1).astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    cos = (v @ v.T).reshape(s, k, s, k)
    scene_a, tok_a, scene_b, tok_b = np.meshgrid(np.arange(s), np.arange(k), np.arange(s), np.arange(k),
                                                 indexing="ij")
    diff_scene, diff_tok = scene_a != scene_b, tok_a != tok_b

    def mean(mask):
        return float(cos[mask].mean()) if mask.any() else None

    same, other = mean(diff_scene & ~diff_tok), mean(diff_scene & diff_tok)
    return {"same_token_cosine": same, "different_token_cosine": other,
            "gap": same - other if same is not None and other is not None else None,
            "same_scene_cosine": mean(~diff_scene & diff_tok)}


@torch.no_grad()
def _token_grid(model, ds, pairs, tokens, n_scenes, n_tokens, rng, device) -> dict[str, Any]:
    rows = _pick_scenes(ds, pairs, n_scenes, rng)
    seqs, counts = most_frequent_sequences(tokens, n_tokens)
    s, k = len(rows), len(seqs)
    x_t = _frames(ds, pairs[rows, 0], device)  # (S, 3, H, W)
    decoded = model.decode(x_t.repeat_interleave(k, 0), torch.as_tensor(seqs, device=device).repeat(s, 1)).float()
    decoded = decoded.view(s, k, *x_t.shape[1:])
    diff = (decoded - x_t[:, None]).cpu().numpy()
    scenes = []
    for r in rows:
        i = int(pairs[r, 0])
        e = int(ds.episode_index[i])
        scenes.append({"episode": e, "frame": i, "frame_in_episode": i - int(ds.episodes[e]["start"]),
                       "task": ds.episodes[e].get("task")})
    return {"scenes": scenes,
            "token_sequences": [{"tokens": q.tolist(), "count": int(c), "fraction": float(c / len(tokens))}
                                for q, c in zip(seqs, counts)],
            "consistency": cosine_consistency(diff),
            "_x_t": output_to_uint8(x_t),
            "_decoded": output_to_uint8(decoded.flatten(0, 1)).reshape(s, k, *decoded.shape[3:], 3),
            "_diff": diff.mean(2)}  # (S, K, H, W): channel-mean signed change


@torch.no_grad()
def _examples(model, ds, pairs, tokens, rng, device, n: int = 4) -> dict[str, np.ndarray]:
    rows = np.sort(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))
    x_t, x_next = _frames(ds, pairs[rows, 0], device), _frames(ds, pairs[rows, 1], device)
    recon = model.decode(x_t, torch.as_tensor(tokens[rows], device=device)).float()
    return {"x_t": output_to_uint8(x_t), "x_next": output_to_uint8(x_next), "recon": output_to_uint8(recon),
            "copy_err": (x_next - x_t).abs().mean(1).cpu().numpy(), "recon_err": (recon - x_next).abs().mean(1)
            .cpu().numpy(), "tokens": tokens[rows], "frames": pairs[rows]}


# ---------------------------------------------------------------------------------------------
# report pieces
# ---------------------------------------------------------------------------------------------
def _dataset_info(ds, split, probe_split, all_pairs, pairs) -> dict[str, Any]:
    eps = ds.split_episodes(split)
    windows = sorted({(int(e["window_frames"]), float(e.get("fps") or 0)) for e in eps})
    return {"path": str(ds.root), "frames": len(ds), "frame_shape": list(ds.frames.shape[1:]),
            "split": split, "episodes_in_split": len(eps), "pairs_in_split": int(len(all_pairs)),
            "pairs_evaluated": int(len(pairs)), "probe_split": probe_split,
            "episodes_with_actions": sum(bool(e.get("has_actions")) for e in ds.episodes),
            "windows": [{"frames": h, "fps": f, "seconds": h / f if f else None} for h, f in windows]}


def _warnings(report: dict[str, Any]) -> list[str]:
    out = []
    window = report["model"]["window_s"]
    for w in report["dataset"]["windows"]:
        if w["seconds"] and abs(w["seconds"] - window) > 0.01 * window:
            out.append(f"the model was trained for a {window:g} s window but split '{report['settings']['split']}' "
                       f"has windows of {w['frames']} frames at {w['fps']:g} fps = {w['seconds']:g} s")
    if report["settings"]["split"] == report["settings"]["probe_split"] and report["probe"]["status"] == "ok":
        out.append(f"the probe is fitted and scored on the same split ('{report['settings']['split']}'): its R² is "
                   f"optimistic")
    rec = report["reconstruction"]
    if rec["shuffled_tokens_mse"] is not None and rec["shuffled_tokens_mse"] <= rec["mse"] * 1.01:
        out.append("decoding with another pair's tokens is no worse than with the pair's own: the decoder "
                   "ignores the latent action")
    single = [str(j) for j, p in enumerate(report["codebook"]["per_position"]) if p["codes_used"] <= 1]
    if len(single) == 1:
        out.append(f"token position {single[0]} uses a single code on these pairs: it carries no information")
    elif single:
        out.append(f"token positions {', '.join(single)} use a single code each on these pairs: they carry no "
                   f"information")
    return out


def format_summary(r: dict[str, Any]) -> str:
    """A few lines for a terminal: the headline numbers of a report."""
    d, rec, cb, pr, c = r["dataset"], r["reconstruction"], r["codebook"], r["probe"], r["token_grid"]["consistency"]
    lines = [f"LAQ eval on {d['path']} split {d['split']}: {d['pairs_evaluated']} of {d['pairs_in_split']} pairs",
             f"  reconstruction MSE {_fmt(rec['mse'])} vs copy x_t {_fmt(rec['copy_mse'])}: ratio "
             f"{_fmt(rec['ratio'], '.3f')}, beats copy: {_fmt(rec['beats_copy'])} (PSNR {_fmt(rec['psnr_db'], '.2f')} "
             f"vs {_fmt(rec['copy_psnr_db'], '.2f')} dB; another pair's tokens: MSE "
             f"{_fmt(rec['shuffled_tokens_mse'])})",
             "  codebook       " + ", ".join(f"pos {j}: {p['codes_used']}/{cb['codebook_size']} used, ppl "
                                            f"{p['perplexity']:.2f}" for j, p in enumerate(cb["per_position"]))
             + f"; {cb['distinct_sequences']} distinct sequences"]
    if pr["status"] != "ok":
        lines.append(f"  probe          skipped: {pr['reason']}")
    else:
        names = list(pr["ridge"]["real"]["r2"])
        lines.append(f"  probe R² ({pr['fit_split']} -> {pr['eval_split']}) " + "".join(f"{n:>8s}" for n in names)
                     + f"{'mean':>8s}")
        for kind, label in (("ridge", "ridge"), ("mlp_probe", "MLP")):
            for which, tag in (("real", "real"), ("control", "shuffled")):
                res = pr[kind][which]
                lines.append(f"    {label + ', ' + tag + ' tokens':22s}" + "".join(
                    f"{_fmt(v, '.3f'):>8s}" for v in res["r2"].values()) + f"{_fmt(res['mean_r2'], '.3f'):>8s}")
    lines.append(f"  token grid     cosine of changes: same token {_fmt(c['same_token_cosine'], '.3f')}, different "
                 f"tokens {_fmt(c['different_token_cosine'], '.3f')}")
    lines += [f"  warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def _fmt_acc(v: dict[str, Any]) -> str:
    return f"{v['accuracy']:.0%} ({v['count']})" if v["accuracy"] is not None else f"- ({v['count']})"


def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def format_markdown(r: dict[str, Any]) -> str:
    d, rec, cb, pr, grid = r["dataset"], r["reconstruction"], r["codebook"], r["probe"], r["token_grid"]
    f = r["files"]
    src = r.get("info", {}).get("checkpoint")
    lines = ["# LAQ evaluation", "",
             (f"Checkpoint `{src}`, " if src else "") + f"dataset `{d['path']}`, split `{d['split']}`: "
             f"{d['pairs_evaluated']} of {d['pairs_in_split']} frame pairs (x_t, x_t+H) evaluated, seed "
             f"{r['settings']['seed']}. Model: {r['model']['image_size'][1]}x{r['model']['image_size'][0]} images, "
             f"L = {r['model']['num_tokens']} tokens, |C| = {r['model']['codebook_size']}. Images in the model's "
             f"[-1, 1] scale.", ""]
    if r["warnings"]:
        lines += ["**Warnings**", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    lines += ["## Reconstruction vs copying x_t", "",
              "| | MSE | PSNR [dB] |", "| --- | --- | --- |",
              f"| model: decode(x_t, encode(x_t, x_t+H)) | {_fmt(rec['mse'])} | {_fmt(rec['psnr_db'], '.2f')} |",
              f"| copy baseline: x_t+H = x_t | {_fmt(rec['copy_mse'])} | {_fmt(rec['copy_psnr_db'], '.2f')} |",
              f"| model with another pair's tokens | {_fmt(rec['shuffled_tokens_mse'])} | "
              f"{_fmt(psnr(rec['shuffled_tokens_mse']) if rec['shuffled_tokens_mse'] else None, '.2f')} |", "",
              f"Ratio model / copy: **{_fmt(rec['ratio'], '.3f')}** (beats copy: **{_fmt(rec['beats_copy'])}**); "
              f"the model is better than the copy on {rec['win_rate']:.0%} of the pairs. If decoding with another "
              f"pair's tokens is about as good as with the pair's own, the decoder ignores the latent action.", "",
              f"![examples]({f['examples']})", "",
              "## Codebook use", "",
              "| position | codes used | usage | perplexity |", "| --- | --- | --- | --- |"]
    for j, p in enumerate(cb["per_position"]):
        lines.append(f"| {j} | {p['codes_used']} / {cb['codebook_size']} | {p['usage']:.0%} | {p['perplexity']:.2f} |")
    a = cb["all_positions"]
    lines += [f"| all | {a['codes_used']} / {cb['codebook_size']} | {a['usage']:.0%} | {a['perplexity']:.2f} |", "",
              f"{cb['distinct_sequences']} distinct token sequences of {cb['possible_sequences']} possible, over "
              f"{cb['pairs']} pairs. Perplexity = exp(entropy of the code histogram): 1 means one code, "
              f"|C| = {cb['codebook_size']} means all used equally.", "", f"![codebook]({f['codebook']})", "",
              "## Probe: tokens -> ground-truth actions", ""]
    if pr["status"] != "ok":
        lines += [f"Skipped: {pr['reason']}.", ""]
    else:
        lines += [f"Target: {pr['target']}. Features: {pr['features']}. Fit on `{pr['fit_split']}` "
                  f"({pr['fit_pairs']} pairs), scored on `{pr['eval_split']}` ({pr['eval_pairs']} pairs). Control: "
                  f"{pr['control']}. R² = 1 - SSE / SST on the scored pairs (0 = predicting their mean; "
                  f"- = the dimension does not vary there).", "",
                  "| R² | " + " | ".join(pr["ridge"]["real"]["r2"]) + " | mean |",
                  "| --- " * (len(pr["ridge"]["real"]["r2"]) + 2) + "|"]
        for kind, label in (("ridge", "ridge"), ("mlp_probe", "MLP")):
            for which in ("real", "control"):
                res = pr[kind][which]
                lines.append(f"| {label}, {which} tokens | " + " | ".join(_fmt(v, '.3f') for v in res["r2"].values())
                             + f" | {_fmt(res['mean_r2'], '.3f')} |")
        lines.append("| constant: the fit set's mean | " + " | ".join(
            _fmt(v, '.3f') for v in pr["constant"]["r2"].values()) + f" | {_fmt(pr['constant']['mean_r2'], '.3f')} |")
        lines += ["", f"Sign accuracy where |summed translation| > {pr['sign_threshold_m'] * 1000:g} mm (pairs "
                      f"counted in brackets). Motions in a dataset are rarely balanced, so compare with the control "
                      f"and the constant rows rather than with 50%:", "",
                  "| | " + " | ".join(pr["ridge"]["real"]["sign_accuracy"]) + " |",
                  "| --- " * (len(pr["ridge"]["real"]["sign_accuracy"]) + 1) + "|"]
        for kind, label in (("ridge", "ridge"), ("mlp_probe", "MLP")):
            for which in ("real", "control"):
                acc = pr[kind][which]["sign_accuracy"]
                lines.append(f"| {label}, {which} tokens | " + " | ".join(map(_fmt_acc, acc.values())) + " |")
        lines.append("| constant: the fit set's mean | " + " | ".join(
            map(_fmt_acc, pr["constant"]["sign_accuracy"].values())) + " |")
        lines += ["", f"![probe]({f['probe']})", ""]
    c = grid["consistency"]
    seqs = ", ".join(f"`{'-'.join(map(str, q['tokens']))}` ({q['count']})" for q in grid["token_sequences"])
    lines += ["## Token grid", "",
              f"Rows: {len(grid['scenes'])} frames x_t from {len({sc['episode'] for sc in grid['scenes']})} "
              f"different episodes of `{d['split']}`. Columns: x_t, then "
              f"x_t+H decoded from x_t with each of the {len(grid['token_sequences'])} most frequent token "
              f"sequences ({seqs}; pairs in brackets). The second image shows decoded - x_t (channel mean; red = "
              f"brighter, blue = darker): if a token sequence is a latent action, its column should show the same "
              f"kind of motion in every row.", "", f"![grid]({f['grid']})", "", f"![grid diff]({f['grid_diff']})", "",
              "Consistency: the cosine similarity between the change images (decoded - x_t, as vectors of pixels) "
              "of the same token sequence in two different scenes, against that of two different sequences in two "
              "different scenes. Same token clearly above different tokens supports \"the same token moves things "
              "the same way\"; the number is crude (objects sit in different places in different scenes). The "
              "same-scene value is the similarity of different sequences' changes on one frame: near 1 means "
              "the tokens barely change what is decoded.", "",
              "| same token, different scenes | different tokens, different scenes | gap | same scene, different "
              "tokens |", "| --- | --- | --- | --- |",
              f"| {_fmt(c['same_token_cosine'], '.3f')} | {_fmt(c['different_token_cosine'], '.3f')} | "
              f"{_fmt(c['gap'], '.3f')} | {_fmt(c['same_scene_cosine'], '.3f')} |", "",
              f"All numbers: [{f['json']}]({f['json']}). Took {r.get('elapsed_s', 0):.1f} s.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas directly: no pyplot, no global backend change)
# ---------------------------------------------------------------------------------------------
def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_codebook(path: Path, cb: dict[str, Any]) -> None:
    n = cb["num_tokens"]
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 2.6 * rows)
    for j, p in enumerate(cb["per_position"]):
        ax = fig.add_subplot(rows, cols, j + 1)
        counts = np.asarray(p["counts"])
        ax.bar(np.arange(len(counts)), counts / max(counts.sum(), 1), color="tab:blue")
        ax.set_title(f"position {j}: {p['codes_used']}/{cb['codebook_size']} used, ppl {p['perplexity']:.2f}",
                     fontsize=9)
        ax.set_xlabel("code", fontsize=8)
        ax.set_ylabel("fraction of pairs", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_probe(path: Path, probe: dict[str, Any], names) -> None:
    fig = _figure(9, 3.4)
    if probe["status"] != "ok":
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, f"probe skipped: {probe['reason']}", ha="center", va="center", wrap=True)
        fig.savefig(path)
        return
    for i, (kind, label) in enumerate((("ridge", "ridge probe"), ("mlp_probe", "MLP probe"))):
        ax = fig.add_subplot(1, 2, i + 1)
        x = np.arange(len(names))
        for off, which, colour in ((-0.2, "real", "tab:blue"), (0.2, "control", "tab:gray")):
            r2 = [probe[kind][which]["r2"][n] for n in names]
            ax.bar(x + off, [max(v, -1.0) if v is not None else 0.0 for v in r2], width=0.4, color=colour,
                   label="real tokens" if which == "real" else "shuffled tokens (control)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylim(-1.05, 1.0)
        ax.set_ylabel(f"R² on {probe['eval_split']} (clipped at -1)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


GRID_TILE_IN = 1.3  # inches per image tile in the token grids (100 dpi)


def grid_figure_size(scenes: int, sequences: int) -> tuple[int, int]:
    """Pixel size (width, height) of token_grid.png / token_grid_diff.png for a grid of that shape."""
    w_in, h_in = _grid_inches(scenes, sequences)
    return round(w_in * 100), round(h_in * 100)


def _grid_inches(scenes: int, sequences: int) -> tuple[float, float]:
    return GRID_TILE_IN * (1 + sequences) + 0.5, GRID_TILE_IN * scenes + 0.7


def _plot_grid(path: Path, diff_path: Path, grid: dict[str, Any]) -> None:
    x_t, decoded, diff = grid["_x_t"], grid["_decoded"], grid["_diff"]
    s, k = decoded.shape[:2]
    vmax = float(np.percentile(np.abs(diff), 99.5)) or 1e-6
    for out, show_diff in ((path, False), (diff_path, True)):
        w_in, h_in = _grid_inches(s, k)
        fig = _figure(w_in, h_in)
        fig.subplots_adjust(left=0.4 / w_in, right=1 - 0.1 / w_in, bottom=0.1 / h_in, top=1 - 0.6 / h_in,
                            wspace=0.05, hspace=0.05)
        fig.suptitle("decoded x_t+H - x_t per latent-action token sequence" if show_diff else
                     "decoded x_t+H per latent-action token sequence", fontsize=9)
        for r in range(s):
            for c in range(k + 1):
                ax = fig.add_subplot(s, k + 1, r * (k + 1) + c + 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.imshow(x_t[r])
                    scene = grid["scenes"][r]
                    ax.set_ylabel(f"ep {scene['episode']}\n{scene['task'] or ''}", fontsize=6)
                elif show_diff:
                    ax.imshow(diff[r, c - 1], cmap="coolwarm", vmin=-vmax, vmax=vmax)
                else:
                    ax.imshow(decoded[r, c - 1])
                if r == 0:
                    ax.set_title("x_t" if c == 0 else "-".join(map(str, grid["token_sequences"][c - 1]["tokens"])),
                                 fontsize=7)
        fig.savefig(out)


def _plot_examples(path: Path, ex: dict[str, np.ndarray]) -> None:
    n = len(ex["x_t"])
    fig = _figure(6.5, 1.4 * n + 0.3)
    vmax = max(float(ex["copy_err"].max()), float(ex["recon_err"].max()), 1e-6)
    titles = ("x_t", "x_t+H (truth)", "reconstruction", "|x_t+H - x_t|", "|recon - x_t+H|")
    for r in range(n):
        images = (ex["x_t"][r], ex["x_next"][r], ex["recon"][r], ex["copy_err"][r], ex["recon_err"][r])
        for c, img in enumerate(images):
            ax = fig.add_subplot(n, 5, r * 5 + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if img.ndim == 2:
                ax.imshow(img, cmap="magma", vmin=0, vmax=vmax)
            else:
                ax.imshow(img)
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(f"frame {ex['frames'][r, 0]}\n{'-'.join(map(str, ex['tokens'][r]))}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
