"""Running grids of training runs for the notebooks: build the teacher/student pair once, then
train (or reuse) every method × seed from it. Reading the results back is report.py's job.

A notebook names its runs (a name, a list of dotted overrides of a base params file, and
labels) and calls `run_grid`; nothing about training lives only in a notebook. Layout under a
results root (``results/<profile>``)::

    runs/<name>/          one train() run (rundir.py) + labels.json (method, group, label)
    data/<name>/          its committed record, exported when it finishes (rundata.py)
    teacher_cache/        teacher signals and samples, keyed by what made them
"""
from __future__ import annotations

import contextlib

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import ConfigError, apply_overrides, from_dict, load_yaml, merge, teacher_use_of, to_dict
from ..errors import out_of_resources
from .rundata import MEMORY_FILE, check_rebuilt_pair, duration_text, export_run, recorded_seconds

#: the keys of a model section that say where its weights come from (a pair replaces them)
WEIGHT_KEYS = ("source", "name_or_path", "arch", "n_layer", "n_embd", "n_head", "seed", "prune_to")

DISPLAY = {"sft": "SFT", "kd": "KD", "rkl": "RKL", "jsd": "JSD", "skl": "SKL", "srkl": "SRKL",
           "seqkd": "SeqKD", "dpkd_token": "DPKD-token", "dpkd_seq": "DPKD-seq",
           "no_distill": "mix without distillation",
           "teacher": "teacher", "student_init": "student (start)"}


#: Path checks only: dotted overrides in this environment variable (``;``-separated) are
#: applied to every run config after everything else. tests/test_notebooks.py shrinks the GPU
#: profiles' notebooks to CPU-sized runs with it; `study.notebook_setup` prints it when set,
#: and every run's params.yaml records the result.
CHECK_OVERRIDES_ENV = "DPKD_CHECK_OVERRIDES"


def check_overrides() -> list[str]:
    return [o.strip() for o in os.environ.get(CHECK_OVERRIDES_ENV, "").split(";") if o.strip()]


def _override(key: str, value: Any) -> str:
    """A dotted override whose value survives YAML parsing (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def as_overrides(overrides) -> list[str]:
    """Overrides as `load_config` takes them, from a list of "key=value" strings or a mapping
    {dotted key: value} (the form the params files use). None gives []."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [_override(k, v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def check_keys(where: str, spec: dict, known, required=()) -> dict:
    """A notebook params section refused early, in one line naming it, when it has a key
    nothing reads or lacks a required one."""
    unknown, missing = sorted(set(spec) - set(known)), sorted(set(required) - set(spec))
    if unknown or missing:
        what = f"unknown key(s) {unknown}" if unknown else f"missing {missing}"
        needs = f" (required: {', '.join(sorted(required))})" if required else ""
        raise ConfigError(f"{where}: {what}; its keys are {', '.join(sorted(known))}{needs}")
    return spec


PRIMARY_KEYS = {"metric", "decoding", "splits", "alpha", "comparisons", "effect", "planned_mdd"}


def as_list(metric) -> list[str]:
    """primary.metric, one name or a list, as a list."""
    return [metric] if isinstance(metric, str) else list(metric)


def check_primary(primary: dict) -> dict:
    """Notebook 01's declaration (``primary``), refused early when it has a key nothing reads."""
    return check_keys("primary", primary, PRIMARY_KEYS)


#: the eval switch each declarable metric is read from (report.per_example): a declared metric
#: whose switch is off for a run of an arm, or for the start, is refused before any run
METRIC_SWITCH = {"rouge_l": "eval.greedy", "exact_match": "eval.greedy", "nll": "eval.teacher_forced",
                 "token_acc": "eval.teacher_forced", "kl": "eval.teacher_kl"}


def check_readouts(primary: dict, arms: dict, base_params: str | Path, pair: dict | None = None) -> None:
    """Every declared metric is evaluated by every run of every arm and by the start (a
    ``pair.student.build``'s overrides, else the base params): its switch (`METRIC_SWITCH`)
    on in the method's overrides, else the arm's common, else the base params' eval. One
    line naming the metric, the switch and where to set it, before the first run."""
    from ..config import EvalConfig
    base_eval = load_yaml(base_params).get("eval") or {}
    for metric in as_list(primary["metric"]):
        switch = METRIC_SWITCH.get(metric)
        if switch is None:
            continue
        key = switch.split(".", 1)[1]
        default = base_eval.get(key, getattr(EvalConfig(), key))
        where = {f"arms.{name}.methods.{method}": ((spec or {}).get("overrides") or {}).get(
                     switch, (arm.get("common") or {}).get(switch, default))
                 for name, arm in arms.items() for method, spec in arm["methods"].items()}
        start = ((pair or {}).get("student") or {})
        where["pair.student"] = (start.get("build") or {}).get(switch, default)
        off = [w for w, on in where.items() if not on]
        if off:
            raise ConfigError(f"primary.metric {metric!r} is read from {switch}, which is off for "
                              f"{', '.join(off[:3])}{' ...' if len(off) > 3 else ''}: set {switch}: true "
                              f"in each arm's common and in pair.student.build")


PILOT_KEYS = {"run", "split", "common", "readouts", "variance", "rerun", "lr_grid", "starts", "methods",
              "settings", "seeds", "recorded", "chosen", "results_root"}


def check_pilot(pilot: dict, arms: dict | None = None) -> dict:
    """Notebook 01's ``pilot``, refused early when it has a key nothing reads; with the params'
    ``arms``, its stages too (`pilot_runs`: keys, arm, methods, choose_on)."""
    check_keys("pilot", pilot, PILOT_KEYS)
    if arms is not None:
        pilot_runs(pilot, arms)
    return pilot


def family_size(primary: dict, splits: Sequence[str] | None = None) -> int:
    """m, the number of tests notebook 01's ``primary`` declares and Holm corrects together:
    metrics (one name or a list) × pairs × splits."""
    splits = primary["splits"] if splits is None else splits
    return len(as_list(primary["metric"])) * len(primary["comparisons"]) * len(splits)


def strip_seed(name: str) -> str:
    return re.sub(r"_s\d+$", "", name)


def method_runs(methods: dict, *, prefix: str = "", group: str = "main",
                common=None) -> list[tuple[str, list, dict]]:
    """Run specs from a notebook's `methods` parameter.

    ``methods`` maps a method key to ``{"seeds": [...], "overrides": {...}, "objective":
    <default: the key>, "label": ...}``; each (method, seed) becomes the run
    ``<prefix><method>_s<seed>`` with ``common`` overrides, then ``train.objective`` and
    ``train.seed``, then the method's own overrides.
    """
    runs = []
    for method, spec in methods.items():
        spec = spec or {}
        for seed in spec.get("seeds", [1]):
            overrides = as_overrides(common) + [f"train.objective={spec.get('objective', method)}",
                                                f"train.seed={seed}"] + as_overrides(spec.get("overrides"))
            runs.append((f"{prefix}{method}_s{seed}", overrides,
                         {"method": f"{prefix}{method}", "group": group,
                          "label": spec.get("label", DISPLAY.get(method, method))}))
    return runs


def run_config(base_params: str | Path, name: str, overrides: Sequence[str], results_root,
               pair: dict | None = None):
    """The RunConfig of run `name`: base params, its folder and cache under `results_root`,
    the run's own overrides, then the pair (the built or ready-made student and teacher).
    The grid's one rule: a teacher section goes only to the runs that use a teacher (an SFT
    run's resolved params say ``teacher: null``); the `train` command line has no such rule
    and refuses a teacher an objective does not use."""
    root = Path(results_root)
    data = apply_overrides(load_yaml(base_params), [
        _override("output_dir", str(root / "runs" / name)),
        _override("cache_dir", str(root / "teacher_cache"))] + as_overrides(overrides))
    try:
        uses_teacher = bool(teacher_use_of(data))  # the objective, the control's pre-train KD, or eval KL
    except ConfigError as err:
        raise ConfigError(f"run {name!r} ({base_params} + {' '.join(as_overrides(overrides))}): {err}") from None
    for role, section in (pair or {}).items():
        if section is None:
            data[role] = None
        else:  # the built model replaces where the weights come from; the rest (LoRA, 4-bit) stays
            kept = {k: v for k, v in (data.get(role) or {}).items() if k not in WEIGHT_KEYS}
            data[role] = merge(kept, section)
    if not uses_teacher:  # the base's or the pair's teacher goes only to the runs that use one
        data["teacher"] = None
    data = apply_overrides(data, check_overrides())
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"run {name!r} ({base_params} + {' '.join(as_overrides(overrides))}): {err}") from None


def _finished(run_dir: Path) -> bool:
    from ..rundir import RunDir
    return RunDir(run_dir).is_finished()


def _write_json_if_changed(path: Path, obj: dict) -> None:
    from ..io import write_json
    try:
        if json.loads(path.read_text()) == obj:
            return
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    write_json(path, obj)


def run_grid(base_params: str | Path, runs: Iterable, results_root: str | Path, *,
             force: bool = False, pair: dict | None = None, progress: bool = True,
             verbose: bool = True, measure: bool = False) -> list[dict]:
    """Train (or reuse) every run into ``<results_root>/runs/<name>``; returns their summaries.

    ``runs``: (name, overrides[, labels]) tuples. A finished run with the same resolved
    params is reused; ``force`` recomputes. Every config is resolved (and so validated)
    before the first run starts: a bad override costs a second, not an hour. ``measure``:
    each run trained now records its peak memory and time per phase (`measure_phases`) in
    its ``memory.json`` (exported with its record).
    """
    from ..rundir import RunDir, other_code_said_once
    from ..train import train
    specs = [(name, as_overrides(ov), dict(rest[0]) if rest else {}) for name, ov, *rest in runs]
    names = [s[0] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"duplicate run names: {dup}")
    configs = [(name, run_config(base_params, name, ov, results_root, pair), labels, ov)
               for name, ov, labels in specs]
    summaries, trained, reused_names = [], [], []
    recorded = recorded_seconds(results_root)   # before any run rewrites its record

    def reusable(cfg) -> bool:   # what train() will reuse as it is (RunDir.prepare)
        return RunDir(cfg.output_dir).reusable(to_dict(cfg), force)

    def say_reused(upto: int) -> None:  # a streak of reused runs in one line: their numbers are in the tables
        if verbose and reused_names:
            first = upto - len(reused_names) + 1
            where = f"{first}/{len(configs)}" if first == upto else f"{first}-{upto}/{len(configs)}"
            print(f"[{where}] reused, finished earlier: {', '.join(reused_names)}", flush=True)
        reused_names.clear()
        say_other_code()   # before hours of training: --strict-code may be wanted

    with other_code_said_once() as say_other_code:
        try:
            for i, (name, cfg, labels, ov) in enumerate(configs, 1):
                run_dir = Path(cfg.output_dir)
                reused = reusable(cfg)
                if not reused:
                    say_reused(i - 1)
                tick = time.time()
                probe = measure_phases() if measure and not reused else None
                summary = train(cfg, force=force, progress=progress, on_phase=probe)
                if probe is not None:
                    probe.close()
                    _write_json_if_changed(run_dir / MEMORY_FILE, _with_plan(cfg, probe.record(), name))
                _write_json_if_changed(run_dir / "labels.json", {
                    "name": name, "method": labels.get("method", strip_seed(name)), **labels, "overrides": ov})
                export_run(run_dir, results_root)   # the committed record: data/<name> (rundata.py)
                summaries.append(summary)
                if reused:
                    reused_names.append(name)
                    continue
                trained.append((name, time.time() - tick))
                if verbose:
                    left = [n for n, c, *_ in configs[i:] if not reusable(c)]
                    print(f"[{i}/{len(configs)}] {run_line(name, summary, time.time() - tick)}"
                          f"{eta_text(left, trained, recorded)}", flush=True)
        finally:   # also when a run fails: the runs reused before it are said
            say_reused(len(summaries))
    return summaries


def _with_plan(cfg, measured: dict, name: str) -> dict:
    """A measured run's record with the planner's bytes per phase beside its peaks: planned now,
    while the run's models exist (a saved model's shapes come from its folder, which the
    committed record has not; report.memory_table reads them there). A run resumed past its
    last training step measured no batch, and a plan that fails must not cost the run its
    record: either keeps no plan, with one line saying so."""
    from ..gpu.gpu_check import planned_bytes
    try:
        planned = planned_bytes(cfg, measured)
        return {**measured, "planned_bytes": planned} if planned else measured
    except Exception as err:  # noqa: BLE001 - the measurement is kept; the plan is only beside it
        print(f"note: {name}: no memory plan kept beside its measured peaks ({type(err).__name__}: "
              f"{str(err)[:200]})", flush=True)
        return measured


def measure_phases():
    """The probe `run_grid(measure=True)` passes to train(on_phase=...): peak memory (CUDA:
    max allocated; CPU: the process's peak RSS, reset at each phase) and time per phase."""
    import torch
    from ..gpu.gpu_check import PhaseProbe
    return PhaseProbe(cuda=torch.cuda.is_available())


def eta_text(left: Sequence[str], trained: Sequence[tuple[str, float]],
             recorded: dict[str, float] | None = None) -> str:
    """' · 5 runs to train, about 20 min' (nothing when none is left). ``left``: the names of
    the runs still to train; ``trained``: (name, seconds) of the runs trained so far;
    ``recorded``: the committed records' times (`rundata.recorded_seconds`, read before the
    grid started). A run left with a record counts at its recorded time scaled by the pace of
    this grid so far (seconds taken over seconds recorded, for the runs trained that had a
    record: this machine's load and code against the record's), so a slow DPKD-seq run ahead
    is not priced like the SFT runs behind; one without a record at the mean time of the runs
    trained so far (no estimate for it before one has been trained). Runs to train, not runs
    to list: a reused run costs nothing, so "[1/14] reused" may be followed by "1 run to train"."""
    if not left:
        return ""
    recorded = recorded or {}
    head = f" · {len(left)} run{'s' if len(left) != 1 else ''} to train"
    paced = [(s, recorded[n]) for n, s in trained if n in recorded]
    pace = sum(s for s, _ in paced) / sum(r for _, r in paced) if paced else 1.0
    known = [n for n in left if n in recorded]
    if len(known) < len(left) and not trained:
        return head
    mean = sum(s for _, s in trained) / len(trained) if trained else 0.0
    seconds = pace * sum(recorded[n] for n in known) + mean * (len(left) - len(known))
    return f"{head}, about {duration_text(seconds)}"


def run_line(name: str, summary: dict, seconds: float) -> str:
    """A run just trained in one line: name, steps, time, and its headline numbers (greedy
    ROUGE-L on each evaluated split, the validation NLL): what a notebook prints per run
    instead of a bar (reused runs share one line, `run_grid`)."""
    scores = [f"{split} ROUGE-L {summary[f'{split}_rouge_l']:.1f}"
              for split in (summary.get("eval") or {}) if summary.get(f"{split}_rouge_l") is not None]
    if summary.get("valid_nll") is not None:
        scores.append(f"valid NLL {summary['valid_nll']:.3f}")
    return f"{name}: {summary.get('steps', '?')} steps, {seconds:.0f} s" + (f"; {', '.join(scores)}" if scores else "")


def run_overrides(results_root: str | Path, name: str) -> list[str]:
    """A finished run's own overrides as `run_grid` ran it: the starting point of an ablation
    that changes one thing."""
    path = Path(results_root) / "runs" / name / "labels.json"
    try:
        return list(json.loads(path.read_text())["overrides"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise FileNotFoundError(f"{path}: no record of run {name!r}; run the notebook that "
                                f"trains it first (01)") from None


def _saved(run_dir: Path) -> dict:
    return {"source": "saved", "name_or_path": str(run_dir / "model")}


def prepare_pair(base_params: str | Path, results_root: str | Path, spec: dict, *,
                 force: bool = False, progress: bool = True) -> dict:
    """The teacher and the starting student every method run starts from, evaluated exactly
    like every method (same eval params, same prompts). ``spec`` maps ``teacher`` and
    ``student`` to ``{"build": {overrides}}`` (trained once as an ordinary run of the base
    params: ``runs/teacher``, ``runs/student_init``) or ``{"model": {model section}}`` (a
    ready-made model, hub checkpoints in the paper profile, evaluated into the same folder
    names). Returns the pair for `run_config`."""
    unknown = set(spec) - {"teacher", "student"}
    if unknown:
        raise ConfigError(f"pair: unknown role(s) {sorted(unknown)}; use teacher and student")
    names = {"teacher": "teacher", "student": "student_init"}
    for role, how in spec.items():
        if set(how) not in ({"build"}, {"model"}):
            raise ConfigError(f"pair.{role}: give either build (overrides) or model (a model section)")
    from ..rundir import other_code_said_once
    pair: dict = {}
    # the teacher first: the start is then evaluated beside it where its eval asks for the
    # teacher (eval.teacher_kl: the start's KL(teacher || student)); run_config gives the
    # teacher only to a run that uses one
    with other_code_said_once():   # both builds' "made by other code" said together
        for role in [r for r in ("teacher", "student") if r in spec]:
            how, name = spec[role], names[role]
            if "build" in how:
                run_grid(base_params, [(name, as_overrides(how["build"]),
                                        {"method": name, "group": "pair", "label": DISPLAY[name]})],
                         results_root, force=force, progress=progress, pair=pair or None)
                check_rebuilt_pair(results_root, name, role)   # a continued study (RESUME=1): the recorded model
                pair[role] = _saved(Path(results_root) / "runs" / name)
            else:
                evaluate_models(base_params, {name: how["model"]}, results_root, teacher=pair.get("teacher"),
                                force=force, progress=progress)
                pair[role] = how["model"]
    return pair


def arm_runs(name: str, arm: dict) -> list[tuple[str, list, dict]]:
    """The runs of one arm of a notebook's params: ``{"prefix", "label", "common",
    "methods"}`` (see `method_runs`); the arm's name is the runs' group."""
    runs = method_runs(arm["methods"], prefix=arm.get("prefix", ""), group=name, common=arm.get("common"))
    return [(n, ov, dict(labels, arm=arm.get("label", name))) for n, ov, labels in runs]


def pair_from_results(results_root: str | Path, *, teacher: bool = True, student: bool = True) -> dict:
    """The pair notebook 01 prepared, for a later notebook (an error says to run 01 first):
    built models from their run folders, ready-made ones from their recorded section."""
    root, pair = Path(results_root), {}
    for role, name, wanted in (("teacher", "teacher", teacher), ("student", "student_init", student)):
        if not wanted:
            continue
        run_dir = root / "runs" / name
        if not _finished(run_dir):
            raise FileNotFoundError(f"{run_dir} has no finished {role}: run notebook 01 first "
                                    f"(python -m dpkd_lib.study --only 01)")
        section = json.loads((run_dir / "labels.json").read_text()).get("model")
        pair[role] = section or _saved(run_dir)
    return pair


def evaluate_models(base_params: str | Path, models: dict, results_root: str | Path, *,
                    overrides: Sequence[str] = (), teacher: dict | None = None, force: bool = False,
                    progress: bool = True) -> list[dict]:
    """Evaluate ready-made models (hub checkpoints of the paper profile) like any run, into
    ``runs/<name>`` folders that report.collect reads. ``models`` maps a name (``teacher``,
    ``student_init``, ...) to a model section; ``overrides`` change the eval settings;
    ``teacher`` (a model section) is the teacher of ``eval.teacher_kl``."""
    from ..rundir import other_code_said_once
    out = []
    with other_code_said_once():
        for name, section in models.items():
            cfg = run_config(base_params, name, ["train.objective=sft", *overrides], results_root,
                             {"student": section, "teacher": teacher})
            out.append(_evaluate_model(cfg, name, section, results_root, force=force, progress=progress))
    return out


def _evaluate_model(cfg, name: str, section: dict, results_root: str | Path, *, force: bool,
                    progress: bool) -> dict:
    """One model of `evaluate_models`, holding its run folder's lock (a second process gets
    RunBusy; a finished folder on a read-only mount is read without one)."""
    from ..evaluate import evaluate_model
    from ..io import read_json, write_json, write_yaml
    from ..models import build_model
    from ..rundir import RunDir, code_fingerprint, run_id
    from ..tokenization import build_tokenizer
    params = to_dict(cfg)
    run = RunDir(cfg.output_dir)
    with run.lock(read_only_ok=True):
        if run.read_only:  # reuse a finished run from there, or a one-line refusal
            run.prepare(params, force=force)
            with contextlib.suppress(OSError):   # data/ may sit on the same read-only mount
                export_run(run.path, results_root)
            return read_json(run.file("summary.json"))
        if run.reusable(params, force):
            run.check_code()
            export_run(run.path, results_root)
            return read_json(run.file("summary.json"))
        run.clean()
        write_yaml(run.file("params.yaml"), params)
        run.write_manifest(status="running", run_id=run_id(params), kind="eval_only", code=code_fingerprint())
        tick = time.time()
        if cfg.threads:
            import torch
            torch.set_num_threads(cfg.threads)
        try:
            tokenizer = build_tokenizer(cfg.tokenizer)
            model = build_model(cfg.student, tokenizer, trainable=False)
            summary = evaluate_model(cfg, model, tokenizer, run.path, progress=progress)
        except Exception as err:  # recorded; memory or disk exhausted: one line
            short = out_of_resources(err, f"the evaluation of {name}", "nothing else was changed")
            run.fail(str(short) if short else f"{type(err).__name__}: {str(err)[:300]}")
            if short is None:
                raise
            raise short from None
        del model
        summary.update(objective="eval_only", run_id=run_id(params), wall_time_s=time.time() - tick)
        write_json(run.file("summary.json"), summary)
        run.write_manifest(status="finished", wall_time_s=summary["wall_time_s"])
        _write_json_if_changed(run.file("labels.json"), {"name": name, "method": name, "group": "pair",
                                                         "label": DISPLAY.get(name, name), "model": section})
    export_run(run.path, results_root)
    return summary


ABLATION_KEYS = {"base", "overrides", "label", "seeds"}


def ablation_runs(ablations: dict, reference_runs: dict, overrides_of) -> list[tuple[str, list, dict]]:
    """Notebook 03's runs: each ablation (``{"base": a method of reference_runs, "overrides":
    {...}, "label": ..., "seeds": [...] (default: the seed of its reference run)}``) is its
    reference run of notebook 01 exactly as it ran (``overrides_of(run name)``: its overrides),
    then one change; one run ``abl_<key>_s<seed>`` per seed, against the reference method's run
    of the same seed (``reference_runs`` names one: dpkd_token_s1 -> dpkd_token_s<seed>)."""
    out = []
    for order, (key, spec) in enumerate(ablations.items()):
        check_keys(f"ablations.{key}", spec, ABLATION_KEYS)
        if spec.get("base") not in reference_runs:
            raise ConfigError(f"ablations.{key}.base: {spec.get('base')!r} is not one of reference_runs "
                              f"({', '.join(reference_runs)})")
        first = reference_runs[spec["base"]]
        for seed in spec.get("seeds") or [int(first.rsplit("_s", 1)[1])]:   # default (or null): the reference run's seed
            ref = f"{strip_seed(first)}_s{seed}"
            out.append((f"abl_{key}_s{seed}", overrides_of(ref) + as_overrides(spec.get("overrides")),
                        {"method": f"abl_{key}", "group": "ablation", "label": spec.get("label", key),
                         "base": spec["base"], "reference_run": ref, "order": order}))
    return out


def pilot_overrides(pilot: dict, *, kl: bool = True) -> list[str]:
    """What every pilot run evaluates: its split (valid) and its readouts (``pilot.readouts``,
    eval overrides: greedy and sampled ROUGE-L, NLL and KL on the references), after the
    pilot's ``common`` overrides (e.g. threads). ``kl`` False drops eval.teacher_kl (the
    teacher itself, or a model with no teacher beside it)."""
    readouts = dict(pilot.get("readouts") or {})
    if not kl:
        readouts.pop("eval.teacher_kl", None)
    return (as_overrides(pilot.get("common")) + [f"eval.splits={json.dumps([pilot.get('split', 'valid')])}"]
            + as_overrides(readouts))


# The pilot's candidate readouts: name -> (metric of report.per_example, decoding, the column
# of report.collect). pilot.lr_grid.choose_on names one of them.
PILOT_READOUTS = {
    "greedy ROUGE-L": ("rouge_l", "greedy", "rouge_l"),
    "sampled ROUGE-L": ("rouge_l", "sample", "sample_rouge_l"),
    "reference NLL": ("nll", "teacher_forced", "nll"),
    "KL(teacher‖student)": ("kl", "teacher_forced", "kl"),
}

# The stages of the pilot that train an arm's methods from the pair's start (pilot.<stage>):
# their keys, and what a stage's run is named after.
PILOT_STAGES = {
    # between-seed noise of every readout at the design's own budget
    "variance": {"keys": {"arm", "methods", "seeds", "overrides"}, "prefix": "pilot_var"},
    # the same seed again under one changed setting (``overrides``: e.g. another thread count,
    # another summation order, as another CPU gives): how far a readout moves on a rerun
    "rerun": {"keys": {"arm", "methods", "seeds", "overrides", "label"}, "prefix": "pilot_rerun"},
    # each objective alone at its own learning rate; ``choose_on``: the readout that picks it
    "lr_grid": {"keys": {"arm", "methods", "seeds", "lrs", "overrides", "choose_on"}, "prefix": "pilot_lr"},
}


def pilot_stage_runs(pilot: dict, arms: dict, stage: str) -> list[tuple[str, list, dict]]:
    """The runs of one pilot stage (`PILOT_STAGES`): ``pilot.<stage>`` = {"arm": an arm of the
    params (its common and method overrides), "methods": [...] (default: all of the arm's),
    "seeds": [...], "overrides": {...} (after the readouts: e.g. fewer readouts where a stage
    needs fewer)} plus, for ``lr_grid``, "lrs": [...] (each method × rate × seed; the rate
    replaces the arm's); for ``rerun`` the overrides are what the rerun changes. Every run
    starts from the pair's start and evaluates `pilot_overrides`; it is named
    ``<prefix>_<method>[_<lr>]_s<seed>`` and labelled with its stage, method and setting."""
    spec, known = pilot[stage], PILOT_STAGES[stage]
    check_keys(f"pilot.{stage}", spec, known["keys"], {"arm"} | ({"lrs"} if stage == "lr_grid" else set()))
    if spec["arm"] not in arms:
        raise ConfigError(f"pilot.{stage}.arm: {spec['arm']!r} is not an arm of the params ({', '.join(arms)})")
    if spec.get("choose_on", next(iter(PILOT_READOUTS))) not in PILOT_READOUTS:
        raise ConfigError(f"pilot.{stage}.choose_on: {spec['choose_on']!r} is not a pilot readout "
                          f"({', '.join(PILOT_READOUTS)})")
    arm = arms[spec["arm"]]
    methods = spec.get("methods") or list(arm["methods"])
    missing = [m for m in methods if m not in arm["methods"]]
    if missing:
        raise ConfigError(f"pilot.{stage}.methods: {missing} not in arm {spec['arm']!r} "
                          f"({', '.join(arm['methods'])})")
    lrs = spec.get("lrs", [None])
    out = []
    for method in methods:
        mspec = arm["methods"][method] or {}
        if lrs != [None]:  # the rate chosen by an earlier pilot sits in the method's overrides: the grid replaces it
            mspec = dict(mspec, overrides={k: v for k, v in (mspec.get("overrides") or {}).items() if k != "train.lr"})
        for lr in lrs:
            common = dict(arm.get("common") or {}) | ({} if lr is None else {"train.lr": lr})
            one = {method: dict(mspec, seeds=spec.get("seeds", [1]))}
            key = f"{known['prefix']}_{method}" + ("" if lr is None else f"_{lr:g}")
            setting = f"lr {lr:g}" if lr is not None else spec.get("label", "design budget")
            for name, ov, labels in method_runs(one, common=common, group="pilot"):
                out.append((f"{key}_s{name.rsplit('_s', 1)[1]}",
                            ov + pilot_overrides(pilot) + as_overrides(spec.get("overrides")),
                            dict(labels, method=key, start="student_init", objective=method,
                                 stage=stage, setting=setting)))
    return out


def pilot_runs(pilot: dict, arms: dict | None) -> list[tuple[str, list, dict]]:
    """Every run of the pilot's arm stages (`pilot_stage_runs`), in the order run_pilot runs them."""
    stages = [s for s in PILOT_STAGES if s in pilot]
    if stages and arms is None:
        raise ConfigError(f"pilot.{stages[0]} names an arm: pass the params' arms (run_pilot(..., arms=params['arms']))")
    return [run for stage in stages for run in pilot_stage_runs(pilot, arms, stage)]


def run_pilot(base_params: str | Path, results_root: str | Path, pilot: dict, pair: dict, *,
              arms: dict | None = None, force: bool = False, progress: bool = True) -> None:
    """The design pilot of notebook 01, on the validation split only. The pair's teacher and
    start are evaluated with every readout (``pilot_teacher``, ``pilot_start_student_init``);
    then, where given: each candidate starting student (``pilot.starts``: student-build
    overrides) with each method × setting × seed trained from it (``pilot.methods``,
    ``pilot.settings``, ``pilot.seeds``); and the arm stages from the pair's start
    (`pilot_runs`: ``variance``, ``rerun``, ``lr_grid``). Every run measures
    ``pilot.readouts`` (`pilot_overrides`). Runs are named ``pilot_*`` (group "pilot"); read
    them with report.pilot_table, pilot_noise, pilot_design and pilot_lrs."""
    arm_runs_ = pilot_runs(pilot, arms)   # validated before anything runs
    evaluate_models(base_params, {"pilot_teacher": pair["teacher"]}, results_root,
                    overrides=pilot_overrides(pilot, kl=False), force=force, progress=progress)
    evaluate_models(base_params, {"pilot_start_student_init": pair["student"]}, results_root,
                    overrides=pilot_overrides(pilot), teacher=pair["teacher"], force=force, progress=progress)
    split = pilot_overrides(pilot)
    starts = [(f"pilot_start_{k}", as_overrides(v) + split,
               {"method": f"pilot_start_{k}", "group": "pilot", "start": k, "label": f"start {k}"})
              for k, v in (pilot.get("starts") or {}).items()]
    if starts:
        run_grid(base_params, starts, results_root, pair={"teacher": pair["teacher"]}, force=force, progress=progress)
    for start, _, _ in starts:
        grid = []
        for method, spec in pilot["methods"].items():
            for setting, values in pilot["settings"].items():
                key = f"pilot_{start[12:]}_{method}_{setting}"
                for seed in pilot["seeds"]:
                    ov = [f"train.objective={spec.get('objective', method)}", f"train.seed={seed}",
                          *as_overrides(spec.get("overrides")), *as_overrides(values), *split]
                    grid.append((f"{key}_s{seed}", ov, {"method": key, "group": "pilot", "start": start[12:],
                                                        "objective": method, "setting": setting}))
        run_grid(base_params, grid, results_root, pair={"teacher": pair["teacher"],
                                                       "student": _saved(Path(results_root) / "runs" / start)},
                 force=force, progress=progress)
    if arm_runs_:
        run_grid(base_params, arm_runs_, results_root, pair=pair, force=force, progress=progress)
