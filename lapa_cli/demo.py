"""`lapa demo`: the main job, the whole LAPA story on the embedded simulator.

1. data      demonstrations of every task: a large set of bags whose actions are then hidden
             (action-free "video"), a small labelled set recorded through the ROS recorder, and
             (when the simulator has it) action-free video of a different embodiment;
2. laq       train LAQ on the action-free video, show its diagnostics, label the video;
3. pretrain  LAPA (latent tokens), ACTIONVLA (the same video with its true actions: an upper
             bound), LAPA on the other embodiment only;
4. finetune  each of them, and SCRATCH, on the same small labelled set;
5. eval      closed loop in the simulator on held-out layouts, with seen and paraphrased
             instructions; a table with success rate +- standard error, and plots.

Every stage writes into --out and is skipped when a previous `lapa demo` finished it with the
same settings, so a second run reuses the work (delete a stage's folder to redo it). Every stage
is also its own `lapa` command; the commands are printed at the end. `--quick` runs the same path
at toy size in a few minutes (the test suite runs it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lapa_cli import UserError

TASKS = ("reach", "push", "pick_place")


@dataclass
class DemoSettings:
    image_size: int = 64
    video_episodes: int = 30  # per task, actions hidden
    labelled_episodes: int = 3  # per task, recorded through ROS (about 10 % of the video)
    other_embodiment_episodes: int = 30  # per task, action-free
    laq_steps: int = 2000
    pretrain_steps: int = 1500
    finetune_steps: int = 800
    num_bins: int = 32  # the labelled set is small: 256 bins would leave one or two samples per bin
    eval_episodes: int = 10  # per task and instruction set
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(video_episodes=2, labelled_episodes=1, other_embodiment_episodes=1, laq_steps=20,
                   pretrain_steps=10, finetune_steps=10, eval_episodes=1)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded simulator",
                       description=__doc__.split("\n\n")[0] + " Stages: data, laq, pretrain, finetune, eval.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="toy size: the same path in a few minutes")
    p.add_argument("--eval-episodes", type=int, help="closed-loop episodes per task and instruction set")
    p.add_argument("--seed", type=int, default=0, help="seed of data layouts and training (default 0)")


def run(args) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    if args.eval_episodes is not None:
        if args.eval_episodes < 1:
            raise UserError("--eval-episodes must be at least 1")
        settings.eval_episodes = args.eval_episodes
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {args.out}: {e.strerror}") from None
    from lapa_policy_node.collect import CollectError
    from lapa_training.checkpoint import CheckpointError
    from lapa_training.data.errors import IngestError
    from lapa_training.trainer import TrainingError

    try:
        return Demo(args.out.resolve(), settings).run()
    except (CollectError, TrainingError, CheckpointError, IngestError) as e:
        raise UserError(f"{e} (finished stages are kept in {args.out}; run again to continue)") from None


class Demo:
    def __init__(self, out: Path, settings: DemoSettings):
        self.out, self.s = out, settings
        self.state_file = out / "stages.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.commands: list[str] = []
        self.times: dict[str, float] = {}

    # ---- stage bookkeeping ---------------------------------------------------------------
    def _key(self, stage: str, depends: dict) -> str:
        return hashlib.sha256(json.dumps({"stage": stage, **depends}, sort_keys=True).encode()).hexdigest()[:16]

    def stage(self, name: str, depends: dict, fn) -> None:
        key = self._key(name, depends)
        if self.state.get(name) == key:
            print(f"[{name}] done earlier with these settings: reusing {self.out}")
            return
        print(f"\n[{name}]")
        t0 = time.perf_counter()
        self.commands = []
        fn()
        self.times[name] = time.perf_counter() - t0
        self.state[name] = key
        self.state.setdefault("commands", {})[name] = self.commands
        self.state.setdefault("seconds", {})[name] = round(self.times[name], 1)
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")

    def cmd(self, text: str) -> None:
        self.commands.append(text)

    # ---- the job -------------------------------------------------------------------------
    def run(self) -> int:
        s, out = self.s, self.out
        settings = asdict(s)
        t_all = time.perf_counter()
        self.stage("data", settings, self.data)
        self.stage("laq", settings, self.laq)
        self.stage("pretrain", settings, self.pretrain)
        self.stage("finetune", settings, self.finetune)
        self.stage("eval", settings, self.evaluate)
        results = json.loads((out / "eval" / "results.json").read_text())
        print(f"\nLAPA demo ({time.perf_counter() - t_all:.0f} s this run; stage times in {self.state_file}):")
        print(format_table(results))
        print(f"\nplots: {out / 'eval' / 'success.png'}, training curves under {out}/*/training_curves.png")
        self._write_commands()
        print(f"commands for each stage: {out / 'COMMANDS.md'}")
        return 0

    def data(self) -> None:
        from lapa_policy_node.collect import collect
        from lapa_training.data.generate import generate
        from lapa_training.data.ingest import IngestOptions, ingest

        s, out = self.s, self.out
        bags = out / "bags"
        generate(bags / "video", list(TASKS), s.video_episodes, image_size=s.image_size, first_seed=s.seed * 100_000)
        self.cmd(f"lapa data generate --out {bags / 'video'} --episodes {s.video_episodes} --image-size {s.image_size}")
        collect(bags / "labelled", list(TASKS), s.labelled_episodes, image_size=s.image_size,
                first_seed=s.seed * 100_000 + 50_000)
        self.cmd(f"lapa data collect --out {bags / 'labelled'} --episodes {s.labelled_episodes} "
                 f"--image-size {s.image_size}")
        other = self._other_embodiment(bags / "other")
        data = out / "data"
        quiet = dict(image_size=s.image_size, seed=s.seed, mode="overwrite", warn=lambda m: None)
        from lapa_training.data.bag_reader import BagOptions

        ingest([bags / "video"], data / "video", IngestOptions(bag=BagOptions(actions="none"), **quiet))
        ingest([bags / "video"], data / "video_actions", IngestOptions(**quiet))
        ingest([bags / "labelled"], data / "labelled", IngestOptions(split=(0.7, 0.3, 0.0), **quiet))
        self.cmd(f"lapa data ingest {bags / 'video'} --actions none --out {data / 'video'} --image-size {s.image_size}")
        self.cmd(f"lapa data ingest {bags / 'labelled'} --out {data / 'labelled'} --image-size {s.image_size}")
        if other:
            ingest([bags / "other"], data / "other", IngestOptions(bag=BagOptions(actions="none"), **quiet))
            self.cmd(f"lapa data ingest {bags / 'other'} --actions none --out {data / 'other'}")

    def _other_embodiment(self, folder: Path) -> bool:
        """Action-free video of a different embodiment, when the simulator has one."""
        import inspect

        from lapa_training.data.generate import generate

        if "embodiment" not in inspect.signature(generate).parameters:
            print("the simulator has no second embodiment yet: skipping the cross-embodiment arm of the demo")
            return False
        generate(folder, list(TASKS), self.s.other_embodiment_episodes, image_size=self.s.image_size,
                 first_seed=self.s.seed * 100_000 + 80_000, record_actions=False, embodiment="floating_gripper")
        self.cmd(f"lapa data generate --embodiment floating_gripper --action-free --episodes "
                 f"{self.s.other_embodiment_episodes} --image-size {self.s.image_size} --out {folder}")
        return True

    def _corpora(self) -> list[Path]:
        data = self.out / "data"
        return [data / "video"] + ([data / "other"] if (data / "other").is_dir() else [])

    def laq(self) -> None:
        from lapa_training.data.dataset import Dataset
        from lapa_training.laq.evaluate_laq import evaluate_laq
        from lapa_training.laq.labelling import label_dataset
        from lapa_training.laq.modeling_laq import LAQModel
        from lapa_training.laq.train_laq import train_laq

        s, out = self.s, self.out
        corpora = self._corpora()
        run = out / "laq"
        final = train_laq(corpora, run, {"preset": "tiny", "image_size": s.image_size},
                          {"steps": s.laq_steps, "val_every": max(1, s.laq_steps // 5),
                           "save_every": max(1, s.laq_steps // 4), "seed": s.seed}, {},
                          overwrite=True)
        self.cmd(f"lapa train laq --data {' '.join(map(str, corpora))} --out {run} --steps {s.laq_steps}")
        model = LAQModel.from_pretrained(final)
        for corpus in corpora:
            label_dataset(model, corpus, overwrite=True, source=str(final))
        self.cmd(f"lapa label --laq {run} --data {' '.join(map(str, corpora))}")
        report = evaluate_laq(model, Dataset(out / "data" / "video_actions"), out / "laq_eval", split="val",
                              probe_split="train", seed=s.seed)
        from lapa_training.laq.evaluate_laq import format_summary

        print(format_summary(report))
        self.cmd(f"lapa eval laq --checkpoint {run} --data {out / 'data' / 'video_actions'} --out {out / 'laq_eval'}")

    def _pretrain_runs(self) -> dict[str, tuple[str, list[Path]]]:
        data = self.out / "data"
        runs = {"lapa": ("latent", [data / "video"]), "actionvla": ("action", [data / "video_actions"])}
        if (data / "other").is_dir():
            runs["lapa_other_embodiment"] = ("latent", [data / "other"])
        return runs

    def pretrain(self) -> None:
        from lapa_training.vla.train_vla import pretrain

        s = self.s
        for name, (objective, corpus) in self._pretrain_runs().items():
            print(f"-- pretraining {name} ({objective}) on {', '.join(p.name for p in corpus)}")
            pretrain(objective, corpus, self.out / "pretrain" / name, {"num_bins": s.num_bins},
                     {"steps": s.pretrain_steps, "val_every": max(1, s.pretrain_steps // 5),
                      "save_every": max(1, s.pretrain_steps // 3), "seed": s.seed}, {}, overwrite=True)
            self.cmd(f"lapa train pretrain --objective {objective} --data {' '.join(map(str, corpus))} "
                     f"--out {self.out / 'pretrain' / name} --steps {s.pretrain_steps} --set model.num_bins={s.num_bins}")

    def _methods(self) -> dict[str, Path | None]:
        methods: dict[str, Path | None] = {"scratch": None}
        for name in self._pretrain_runs():
            methods[name] = self.out / "pretrain" / name
        return methods

    def finetune(self) -> None:
        from lapa_training.vla.train_vla import finetune

        s, labelled = self.s, self.out / "data" / "labelled"
        for name, init in self._methods().items():
            print(f"-- finetuning {name} on the labelled set")
            finetune([labelled], self.out / "finetune" / name, {"num_bins": s.num_bins},
                     {"steps": s.finetune_steps, "val_every": max(1, s.finetune_steps // 4),
                      "save_every": max(1, s.finetune_steps // 2), "seed": s.seed}, {}, init=init, overwrite=True)
            self.cmd(f"lapa train finetune {'--init ' + str(init) + ' ' if init else ''}--data {labelled} "
                     f"--out {self.out / 'finetune' / name} --steps {s.finetune_steps} --set model.num_bins={s.num_bins}")

    def evaluate(self) -> None:
        from lapa_policy_node.policy_api import load_policy
        from lapa_training.eval_policy import evaluate_policy
        from lapa_training.trainer import METRICS_FILE, read_metrics

        s, out = self.s, self.out / "eval"
        results: dict[str, dict] = {"episodes_per_cell": s.eval_episodes, "methods": {}}
        for name in self._methods():
            policy_dir = self.out / "finetune" / name / "model"
            row = {}
            for instructions in ("train", "paraphrase"):
                report = evaluate_policy(load_policy(policy_dir), list(TASKS), s.eval_episodes,
                                         image_size=s.image_size, instruction_set=instructions,
                                         out_dir=out / name / instructions, first_seed=900_000 + s.seed * 1000)
                row[instructions] = {"success_rate": report.success_rate(), "by_task": report.by_task(),
                                     "episodes": len(report.episodes)}
                self.cmd(f"lapa eval policy --policy {policy_dir} --episodes {s.eval_episodes} --image-size "
                         f"{s.image_size} --instructions {instructions} --out {out / name / instructions}")
            val = [r for r in read_metrics(self.out / "finetune" / name / METRICS_FILE) if "val_token_accuracy" in r]
            row["val_token_accuracy"] = val[-1]["val_token_accuracy"] if val else None
            results["methods"][name] = row
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        success_plot(results, out / "success.png")

    def _write_commands(self) -> None:
        lines = ["# The demo's stages as `lapa` commands", "",
                 "Run from the repository root after `./setup.sh`; each line is one stage of `lapa demo`.", "", "```"]
        for stage in ("data", "laq", "pretrain", "finetune", "eval"):
            lines += self.state.get("commands", {}).get(stage, [])
        lines += ["```", ""]
        (self.out / "COMMANDS.md").write_text("\n".join(lines))


def standard_error(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def format_table(results: dict) -> str:
    n = results["episodes_per_cell"]
    lines = [f"  {'method':<24}{'seen instr.':>16}{'paraphrased':>16}{'val token acc':>15}"]
    for name, row in results["methods"].items():
        cells = []
        for key in ("train", "paraphrase"):
            p, eps = row[key]["success_rate"], row[key]["episodes"]
            cells.append(f"{100 * p:5.1f} ± {100 * standard_error(p, eps):4.1f} %")
        acc = row.get("val_token_accuracy")
        lines.append(f"  {name:<24}{cells[0]:>16}{cells[1]:>16}{'' if acc is None else f'{acc:.3f}':>15}")
    lines.append(f"  ({n} episodes per task and instruction set, {len(TASKS)} tasks; ± is one standard error)")
    return "\n".join(lines)


def success_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results["methods"])
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.6))
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("train", "seen instructions"), ("paraphrase", "paraphrased"))):
        rates = [results["methods"][m][key]["success_rate"] for m in names]
        errs = [standard_error(r, results["methods"][m][key]["episodes"]) for r, m in zip(rates, names)]
        ax.bar(x + (k - 0.5) * 0.38, [100 * r for r in rates], 0.38, yerr=[100 * e for e in errs], capsize=3,
               label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("success rate [%]")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("closed-loop success in the simulator (held-out layouts)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
