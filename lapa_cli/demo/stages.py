"""The demo's stages. Each builds the argv of every `lapa` command it needs once, records it (the
stage's part of COMMANDS.md) and runs exactly that argv: in this process, side by side in worker
processes (workers.py), or at the lowest priority beside the real-time recording (background.py)."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import time
from pathlib import Path

from lapa_cli.demo import report
from lapa_cli.demo.settings import CATEGORIES, ONLY_SEEN, OTHER_EMBODIMENT_LOOK, STAGES, SWEEP_METHODS, WORKERS, \
    DemoSettings, Recipe, seed_ranges, stage_keys
from lapa_cli.demo.workers import evaluate_side_by_side, run_lapa, train_side_by_side

# the ROS check's nodes share 2 CPU cores with the in-process cells: a frame may come later than the
# camera watchdog a real arm keeps allows, which here would only cut episodes short
ROS_ARGS = ["--ros-args", "-p", "lapa_policy_server:camera_timeout:=1.0"]


def setting(section: str, key: str, value) -> list[str]:
    """`--set section.key=value`, the value written so that the YAML parser reads it back."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return ["--set", f"{section}.{key}={text}"]


class Demo:
    def __init__(self, out: Path, settings: DemoSettings, recipe: Recipe | None = None):
        self.out, self.s = out, settings
        self.recipe = recipe or Recipe.load()
        self.seeds = seed_ranges(settings)
        self.state_file = out / "stages.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.commands: list[str] = []  # the running stage's, as `lapa ...` lines
        self.steps: dict[str, float] = {}  # the running stage's timed steps
        self.times: dict[str, float] = {}

    # ---- stage bookkeeping ---------------------------------------------------------------
    def stage(self, name: str, key: str, fn) -> None:
        if self.state.get(name) == key:
            print(f"[{name}] done earlier with these settings: reusing {self.out}")
            return
        print(f"\n[{name}]")
        t0 = time.perf_counter()
        self.commands, self.steps = [], {}
        fn()
        self.times[name] = time.perf_counter() - t0
        self.state[name] = key
        self.state.setdefault("commands", {})[name] = self.commands
        self.state.setdefault("step_seconds", {})[name] = self.steps  # replaces an earlier run's, like commands
        self.state.setdefault("seconds", {})[name] = round(self.times[name], 1)
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")

    def record(self, *argv) -> list[str]:
        """A command's argv (str'd), recorded as the `lapa` line it is."""
        argv = [str(a) for a in argv]
        self.commands.append("lapa " + shlex.join(argv))
        return argv

    def note(self, text: str) -> None:
        self.commands.append(f"# {text}")

    def lapa(self, *argv) -> None:
        """Record a command and run it in this process."""
        run_lapa(self.record(*argv))

    @contextlib.contextmanager
    def timed(self, what: str):
        """Time one step of the running stage: printed, and kept in stages.json for RESULTS.md."""
        t0 = time.perf_counter()
        yield
        seconds = round(time.perf_counter() - t0, 1)
        print(f"   ({what}: {seconds:.0f} s)")
        self.steps[what] = seconds

    # ---- the job -------------------------------------------------------------------------
    def run(self) -> int:
        out = self.out
        keys = stage_keys(self.s, self.recipe)  # a stage is redone when a setting it or an earlier one reads changed
        t_all = time.perf_counter()
        for name, fn in zip(STAGES, (self.data, self.laq, self.pretrain, self.finetune, self.evaluate, self.sweep)):
            self.stage(name, keys[name], fn)
        results = json.loads((out / "eval" / "results.json").read_text())
        sweep = json.loads((out / "sweep" / "results.json").read_text())
        print(f"\nLAPA demo ({time.perf_counter() - t_all:.0f} s this run; stage times in {self.state_file}):")
        print(report.format_table(results))
        print(report.format_sweep(sweep))
        print(f"\nplots: {out / 'eval' / 'success.png'}, {out / 'sweep' / 'sweep.png'}, rollouts in "
              f"{out / 'eval'}/<method>/<category>/rollouts.png, training curves under {out}/*/*/training_curves.png")
        report.write_commands(out, self.state)
        report.write_results(out, self.s, self.state, results, sweep)
        print(f"commands for each stage: {out / 'COMMANDS.md'}; the results as markdown: {out / 'RESULTS.md'}")
        return 0

    # ---- 1. data -------------------------------------------------------------------------
    def data(self) -> None:
        from lapa_cli.background import LowPriorityCommands, lapa_argv

        s, seeds = self.s, self.seeds
        bags, data = self.out / "bags", self.out / "data"
        for stale in ("video", "labelled", "other"):  # an earlier run's bags, made with other settings
            shutil.rmtree(bags / stale, ignore_errors=True)
        tasks, size = ",".join(s.tasks), ["--image-size", s.image_size]
        with self.timed(f"generate {len(s.tasks) * s.video_episodes} video episodes"):
            video = seeds["video"]
            self.lapa("data", "generate", "--out", bags / "video", "--tasks", tasks, "--episodes", video.episodes, *size,
                      "--first-seed", video.first, "--combinations", video.combinations, "--workers", WORKERS)
        # the recording runs in real time and leaves the cores mostly idle: meanwhile the video is ingested
        # and the other embodiment's video generated and ingested, at the lowest priority
        ingest = [*size, "--split", ",".join(f"{f:g}" for f in s.video_split), "--seed", s.seed, "--overwrite"]
        other, look = seeds["other_embodiment"], OTHER_EMBODIMENT_LOOK
        self.note("the next four run at the lowest priority, beside the recording (lapa data collect)")
        background = [
            LowPriorityCommands("generating and ingesting the other embodiment's video", [
                lapa_argv(*self.record("data", "generate", "--embodiment", "floating_gripper", "--action-free",
                                       "--scene-colors", look["scene_colors"],
                                       "--embodiment-colors", look["embodiment_colors"], "--tasks", tasks,
                                       "--episodes", other.episodes, *size, "--first-seed", other.first,
                                       "--combinations", other.combinations, "--workers", WORKERS,
                                       "--out", bags / "other")),
                lapa_argv(*self.record("data", "ingest", bags / "other", "--actions", "none", "--out", data / "other",
                                       *ingest))], bags / "other.log"),
            # the same video with its actions: ACTIONVLA's corpus, and LAQ's diagnostics
            LowPriorityCommands("ingesting the video", [
                lapa_argv(*self.record("data", "ingest", bags / "video", "--actions", "none", "--out", data / "video",
                                       *ingest)),
                lapa_argv(*self.record("data", "ingest", bags / "video", "--out", data / "video_actions", *ingest))],
                bags / "video_ingest.log")]
        try:
            with self.timed(f"record {len(s.tasks) * s.labelled_episodes} labelled episodes through ROS "
                            f"(alongside: ingest the video, generate and ingest "
                            f"{len(s.tasks) * s.other_embodiment_episodes} other-embodiment episodes)"):
                for job in background:
                    job.start()
                labelled = seeds["labelled"]
                self.lapa("data", "collect", "--out", bags / "labelled", "--tasks", tasks, "--episodes",
                          labelled.episodes, *size, "--first-seed", labelled.first,
                          "--combinations", labelled.combinations)
            with self.timed("finish the jobs alongside; ingest the labelled episodes"):
                for job in background:
                    job.wait()
                self.lapa("data", "ingest", bags / "labelled", "--out", data / "labelled", *size,
                          "--split", "0.8,0.2,0", "--seed", s.seed, "--overwrite")
        except BaseException:  # a failed recording or job, or Ctrl-C: the other jobs stop too
            for job in background:
                job.stop()
            raise

    # ---- 2. laq --------------------------------------------------------------------------
    def laq(self) -> None:
        from lapa_training.data.dataset import Dataset
        from lapa_training.laq.evaluate_laq import MIN_EVAL_PAIRS

        s, data, run = self.s, self.out / "data", self.out / "laq"
        corpora = [data / "video"] + ([data / "other"] if (data / "other").is_dir() else [])
        # on the robot's video alone: trained on the other embodiment's too, its tokens carried less of the robot's motion
        with self.timed(f"train LAQ ({s.laq_steps} steps)"):
            self.lapa("train", "laq", "--data", data / "video", "--out", run, "--preset", "tiny",
                      *setting("model", "image_size", s.image_size), "--steps", s.laq_steps, "--seed", s.seed,
                      *setting("train", "val_every", max(1, s.laq_steps // 5)),
                      *setting("train", "save_every", max(1, s.laq_steps // 4)), "--overwrite")
        with self.timed("label the action-free video"):
            self.lapa("label", "--laq", run, "--data", *corpora, "--device", "cpu", "--overwrite")
        # a toy run with one task has no validation video (2 episodes); its diagnostics then read the training video
        enough = len(Dataset(data / "video_actions").pairs("val")) >= MIN_EVAL_PAIRS
        self.lapa("eval", "laq", "--checkpoint", run, "--data", data / "video_actions", "--out", self.out / "laq_eval",
                  "--split", "val" if enough else "train", "--seed", s.seed, "--device", "cpu")

    # ---- 3. pretrain ---------------------------------------------------------------------
    def _pretrain_runs(self) -> dict[str, tuple[str, list[Path]]]:
        data = self.out / "data"
        runs = {"lapa": ("latent", [data / "video"]), "actionvla": ("action", [data / "video_actions"])}
        if (data / "other").is_dir():
            runs["lapa_other_embodiment"] = ("latent", [data / "other"])
        return runs

    def pretrain(self) -> None:
        s, jobs = self.s, {}
        for name, (objective, corpus) in self._pretrain_runs().items():
            print(f"-- pretraining {name} ({objective}) on {', '.join(p.name for p in corpus)}")
            run = self.out / "pretrain" / name
            argv = ["train", "pretrain", "--objective", objective, "--data", *corpus, "--out", run,
                    "--config", self.recipe.file(objective), *setting("model", "num_bins", s.num_bins),
                    "--steps", s.pretrain_steps, "--lr", s.pretrain_lr, "--seed", s.seed,
                    *setting("train", "val_every", max(1, s.pretrain_steps // 5)),
                    *setting("train", "save_every", max(1, s.pretrain_steps // 3))]
            warmup = self.recipe.warmup_steps(s.pretrain_steps)
            if objective == "action" and warmup != self.recipe.actionvla["train"].get("warmup_steps"):
                argv += setting("train", "warmup_steps", warmup)  # the file's share of these steps
            jobs[name] = (self.record(*argv, "--overwrite", "--quiet"), run, s.pretrain_steps)
        with self.timed(f"pretrain {len(jobs)} runs"):
            train_side_by_side("pretraining", jobs)

    # ---- 4. finetune ---------------------------------------------------------------------
    def _methods(self) -> dict[str, Path | None]:
        methods: dict[str, Path | None] = {"scratch": None}
        for name in self._pretrain_runs():
            methods[name] = self.out / "pretrain" / name
        return methods

    def _finetune_job(self, init: Path | None, run: Path, episodes: int | None = None,
                      keep_head: bool = False) -> tuple[list[str], Path, int]:
        """SCRATCH builds the recipe's model; a pretrained run keeps its own and gets the recipe's head."""
        s = self.s
        argv = ["train", "finetune"]
        if init is None:
            model = ["--config", self.recipe.file("latent"), *setting("model", "num_bins", s.num_bins)]
        else:
            argv += ["--init", init] + (["--keep-head"] if keep_head else [])
            model = [a for k, v in self.recipe.head_only(s.num_bins).items() for a in setting("model", k, v)]
        argv += ["--data", self.out / "data" / "labelled", "--out", run, *model, "--steps", s.finetune_steps,
                 "--lr", s.finetune_lr, "--seed", s.seed, *setting("train", "keep_best", s.keep_best),
                 *setting("train", "val_every", max(1, s.finetune_steps // 8)),
                 *setting("train", "save_every", max(1, s.finetune_steps // 2))]
        if episodes is not None:
            argv += ["--episodes", episodes]
        return self.record(*argv, "--overwrite", "--quiet"), run, s.finetune_steps

    def finetune(self) -> None:
        # ACTIONVLA goes on training the action head it was pretrained with (the same action space; in the
        # paper its actions are the LM's own tokens, kept through finetuning); a latent run gets a fresh one
        on_actions = {name for name, (objective, _) in self._pretrain_runs().items() if objective == "action"}
        jobs = {name: self._finetune_job(init, self.out / "finetune" / name, keep_head=name in on_actions)
                for name, init in self._methods().items()}
        with self.timed(f"finetune {len(jobs)} runs"):
            train_side_by_side("finetuning on the labelled set", jobs)

    # ---- 5. eval -------------------------------------------------------------------------
    def _eval_cells(self, cells: dict[str, tuple[Path, str, Path]], offline: dict[str, tuple[Path, Path]],
                    alongside=None) -> tuple[dict[str, dict], dict[str, dict], object]:
        """Closed-loop cells {key: (policy dir, category, out dir)} and offline cells {key: (policy dir,
        out dir)} against the test demonstrations, side by side in WORKERS processes; alongside(), if
        given, runs in this process meanwhile (workers.evaluate_side_by_side). -> (closed-loop
        results, offline results, what alongside() returned)."""
        from tqdm import tqdm

        s, test = self.s, self.out / "data" / "test"
        jobs = []
        for key, (policy_dir, category, out) in cells.items():
            instructions, combinations = CATEGORIES[category]
            layouts = self.seeds[f"eval/{category}"]
            jobs.append(("closed", key, self.record(
                "eval", "policy", "--policy", policy_dir, "--tasks", *s.tasks, "--episodes", layouts.episodes,
                "--image-size", s.image_size, "--seed", layouts.first, "--instructions", instructions,
                "--combinations", combinations, "--out", out)))
        for key, (policy_dir, out) in offline.items():
            jobs.append(("offline", key, self.record("eval", "actions", "--policy", policy_dir, "--data", test,
                                                     "--out", out)))
        results: dict[tuple[str, str], dict] = {}
        bar = tqdm(total=len(jobs), desc=f"{len(cells)} closed-loop cells ({len(s.tasks) * s.eval_episodes} "
                                         f"episodes each), {len(offline)} offline", unit="cell", dynamic_ncols=True)

        def done(item: tuple[str, str, dict]) -> None:  # also the pool's callback: it must not raise
            kind, key, result = item
            results[(kind, key)] = result
            with contextlib.suppress(Exception):  # (an exception would end the pool's result thread: a hang)
                bar.update()
                bar.write(f"   {key}: {100 * result['success_rate']:.0f} % of {result['episodes']}"
                          if kind == "closed" else f"   {key} offline: direction cosine {result['cosine_xy']:.2f}")

        try:
            side = evaluate_side_by_side(jobs, WORKERS, done, alongside)
        finally:
            bar.close()
        return ({key: results[("closed", key)] for key in cells}, {key: results[("offline", key)] for key in offline},
                side)

    def _test_demonstrations(self) -> Path:
        """Expert demonstrations, with actions, of the seen category's evaluation layouts (twice as many
        per task as the closed-loop cells): the offline action evaluation's data. Made here, not in the
        data stage, because only evaluation uses them."""
        from lapa_training.data.dataset import Dataset, is_dataset

        s, bags, data = self.s, self.out / "bags" / "test", self.out / "data" / "test"
        layouts = self.seeds["test_demonstrations"]
        wanted = sorted((task, seed) for task in s.tasks for seed in layouts.seeds(task))
        reuse = is_dataset(data) and sorted((e["task"], e["provenance"]["seed"])
                                            for e in Dataset(data).episodes) == wanted
        generate = ["data", "generate", "--out", bags, "--tasks", ",".join(s.tasks), "--episodes", layouts.episodes,
                    "--image-size", s.image_size, "--first-seed", layouts.first, "--combinations",
                    layouts.combinations, "--workers", WORKERS]
        ingest = ["data", "ingest", bags, "--out", data, "--image-size", s.image_size, "--split", "0,0,1",
                  "--seed", s.seed, "--overwrite"]
        if reuse:
            self.note(f"the next two made {data} in an earlier run; reused")
            self.record(*generate)
            self.record(*ingest)
            return data
        shutil.rmtree(bags, ignore_errors=True)  # an earlier run's, for other tasks or episode counts
        self.lapa(*generate)
        self.lapa(*ingest)
        return data

    def _eval_over_ros(self, out: Path) -> dict:
        """Each category's first layouts through the action server, in real time: per method, the
        categories' `lapa eval policy --ros` commands run in one session of the nodes."""
        from lapa_cli.main import parse
        from lapa_policy_node.ros_eval import evaluate_over_ros
        from lapa_sim.tasks import episode_seeds
        from lapa_training.eval_policy import PolicyReport

        s, cells = self.s, {}
        for name in s.ros_methods:
            policy_dir = self.out / "finetune" / name / "model"
            self.note(f"the next {len(CATEGORIES)} run in one session of the nodes (lapa_policy_node.ros_eval)")
            commands = {}
            for category, (instructions, combinations) in CATEGORIES.items():
                layouts = self.seeds[f"ros/{category}"]
                commands[category] = parse(self.record(
                    "eval", "policy", "--ros", "--policy", policy_dir, "--tasks", *s.tasks,
                    "--episodes", layouts.episodes, "--image-size", s.image_size, "--seed", layouts.first,
                    "--instructions", instructions, "--combinations", combinations, "--out", out / name / category,
                    *ROS_ARGS))
            jobs, categories = [], []  # (task, seed, instruction set), and each job's category
            for category, args in commands.items():
                for task in args.tasks:
                    for seed in episode_seeds(task, args.seed, args.episodes, args.combinations):
                        jobs.append((task, seed, args.instructions))
                        categories.append(category)
            first = next(iter(commands.values()))
            ros = evaluate_over_ros(first.policy, jobs, image_size=first.image_size, out_dir=out / name,
                                    progress=False, ros_args=first.ros_args)
            session = json.loads((out / name / "report.json").read_text())
            by_category: dict[str, dict] = {}
            for category, args in commands.items():  # each command's report: its episodes of the session
                episodes = [e for c, e in zip(categories, ros.episodes) if c == category]
                part = PolicyReport(episodes, ros.act_ms_p50, ros.act_ms_p99, sum(e.seconds for e in episodes))
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "report.json").write_text(json.dumps(
                    {**part.to_dict(), "path": "ros", "control_rate": session["control_rate"],
                     "image_size": args.image_size, "session": str(out / name)}, indent=2) + "\n")
                by_category[category] = {"episodes": len(episodes), "successes": sum(int(e.success) for e in episodes),
                                         "layouts": [[e.task, e.seed] for e in episodes]}
            cells[name] = {"categories": by_category, "act_ms_p50": ros.act_ms_p50, "act_ms_p99": ros.act_ms_p99}
            print(f"   {name} through ROS: " + ", ".join(f"{c['successes']} of {c['episodes']} {category}"
                                                        for category, c in by_category.items())
                  + f" (act p50 {ros.act_ms_p50:.0f} ms)")
        return cells

    def evaluate(self) -> None:
        from lapa_training.trainer import METRICS_FILE, read_metrics

        s, out = self.s, self.out / "eval"
        results: dict[str, dict] = {"episodes_per_cell": s.eval_episodes * len(s.tasks), "tasks": list(s.tasks),
                                    "categories": list(CATEGORIES), "methods": {}}
        self._test_demonstrations()
        models = {name: self.out / "finetune" / name / "model" for name in self._methods()}
        cells = {f"{name}/{category}": (models[name], category, out / name / category)
                 for name in models for category in (("seen",) if name in ONLY_SEEN else CATEGORIES)}
        print(f"-- {len(cells)} closed-loop cells of {len(s.tasks) * s.eval_episodes} episodes and {len(models)} "
              f"offline, {WORKERS} at a time" + (f"; alongside, {', '.join(s.ros_methods)} through the ROS action "
                                                 f"server ({len(CATEGORIES) * len(s.tasks) * s.ros_eval_episodes} "
                                                 f"episodes each, in real time)" if s.ros_methods else ""))
        with self.timed(f"{len(cells)} closed-loop cells and {len(models)} offline, the ROS check alongside"):
            closed, offline, ros = self._eval_cells(
                cells, {name: (models[name], out / name / "offline") for name in models},
                alongside=(lambda: self._eval_over_ros(out / "ros")) if s.ros_methods else None)
        ros = ros or {}
        for name in models:
            row = {category: closed[f"{name}/{category}"] for category in CATEGORIES if f"{name}/{category}" in cells}
            row["offline"] = offline[name]
            val = [r for r in read_metrics(self.out / "finetune" / name / METRICS_FILE) if "val_token_accuracy" in r]
            row["val_token_accuracy"] = val[-1]["val_token_accuracy"] if val else None
            results["methods"][name] = row
        for name, row in ros.items():  # the in-process outcomes of the same layouts: the two paths compared
            for category, cell in row["categories"].items():
                cell_report = out / name / category / "report.json"
                layouts = {tuple(layout) for layout in cell["layouts"]}
                same = [e["success"] for e in json.loads(cell_report.read_text())["episodes"]
                        if (e["task"], e["seed"]) in layouts] if cell_report.is_file() else []
                cell["in_process_successes"] = sum(same) if len(same) == cell["episodes"] else None
        results["ros"] = ros
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report.success_plot(results, out / "success.png")

    # ---- 6. sweep ------------------------------------------------------------------------
    def sweep(self) -> None:
        """SCRATCH vs LAPA finetuned on fewer labelled episodes; the full set is the eval stage's row."""
        from lapa_training.data.dataset import Dataset
        from lapa_training.vla.train_vla import pick_episodes

        s, labelled, out = self.s, self.out / "data" / "labelled", self.out / "sweep"
        full = len(pick_episodes(Dataset(labelled), None, s.seed))
        video = len(Dataset(self.out / "data" / "video").episodes)
        main = json.loads((self.out / "eval" / "results.json").read_text())
        sweep: dict = {"video_episodes": video, "episodes_per_point": main["episodes_per_cell"], "points": []}
        counts = sorted({c for c in s.sweep_labelled_episodes if c < full})
        runs = {(name, count): out / f"{name}_{count}eps" for count in counts for name in SWEEP_METHODS}
        if runs:
            jobs = {f"{name}_{count}eps": self._finetune_job(self._methods()[name], run, count)
                    for (name, count), run in runs.items()}
            train_side_by_side("finetuning on fewer labelled episodes", jobs)
        closed, offline, _ = self._eval_cells(
            {f"{name}_{count}eps": (run / "model", "seen", run / "eval") for (name, count), run in runs.items()},
            {f"{name}_{count}eps": (run / "model", run / "offline") for (name, count), run in runs.items()})
        for count in counts + [full]:
            point = {"labelled_episodes": count, "percent_of_video": 100 * count / video, "methods": {}}
            for name in SWEEP_METHODS:
                if count == full:
                    point["methods"][name] = {**main["methods"][name]["seen"],
                                              "offline": main["methods"][name].get("offline")}
                    continue
                point["methods"][name] = {**closed[f"{name}_{count}eps"], "offline": offline[f"{name}_{count}eps"]}
            sweep["points"].append(point)
        (out / "results.json").write_text(json.dumps(sweep, indent=2) + "\n")
        report.sweep_plot(sweep, out / "sweep.png")
