"""Recipes: every stage of an experiment in one YAML file, run into one run directory.

A recipe has one section per stage. Its keys are exactly the keyword arguments of the
stage's library function (or the fields of that function's options dataclass), so the
recipe, the Python API and the CLI options all say the same thing:

    prepare:                       # agecli.stages.prepare.prepare(dataset, root, run, **keys)
      dataset: utkface
      detector: none
      size: 64
    train:                         # agecli.stages.train.train(...), one entry or a list
      - {name: teacher, arch: resnet50, epochs: 30}
    distill:                       # agecli.stages.distill.distill(...), one entry or a list
      - {name: student, student: mobilenet_v3_small, teacher: "{run}/train/teacher/best.pt"}
    eval:   [...]                  # agecli.stages.evaluate.evaluate(model_path, run, split, ...)
    bench:  {device: cpu}          # agecli.stages.bench.bench(run, **keys)
    report: {}                     # agecli.stages.report.write_report(run, **keys)

Strings may use `{run}` (the run directory) and `{root}` (the data root given with
`--root`), e.g. to name a teacher trained earlier in the same recipe. YAML is read with
`yaml.safe_load` (no tags that import code); anchors and `<<:` merges work for sharing
settings between entries.

Everything is validated against the real signatures before anything runs: an unknown key
names its stage, the valid keys and the closest match. Each step is skipped when its stage
manifest says "complete" (and its options have not changed since), so re-running a recipe
resumes it. The recipe as given (plus `--set` overrides) is copied into the run.

`only` (CLI `--step LABEL`, repeatable) runs just the named steps: a label such as
`train/teacher`, or a section name for all of its steps; the others show as "not selected".
`jobs` (CLI `--jobs N`) runs up to N independent steps of one section at once, each as a
child `python -m agecli run RUN/logs/recipe-<hash>.yaml --step LABEL` (the recipe as the
parent runs it, frozen: RUN/recipe.yaml is rewritten by any later `agecli run` on the run)
logging to RUN/logs/<label>.log, for a GPU that one small model leaves idle. Sections still run one after another, and a
failed step stops the run once its running siblings have finished.

Modules, each importing only those above it:

    kinds       the sections: stage function, folder, order (STAGE_KINDS)
    signatures  keys a function takes (options dataclasses expanded), type checks, binding
    recipe      the file: find, parse, --set overrides; Recipe and Step
    plan        recipe -> validated steps; the call each step makes
    children    --jobs: steps of one section as child processes
    runner      run_recipe: what each step would do, running them, recorded state
    quickstart  the bundled quickstart recipe on the bundled photos
"""

from agecli.recipes.kinds import STAGE_KINDS, StageKind
from agecli.recipes.plan import call_arguments, needs, plan
from agecli.recipes.recipe import Recipe, Step, apply_override, bundled_recipes, find_recipe, load_recipe, parse_recipe
from agecli.recipes.runner import describe_plan, run_recipe, select_steps, step_status
from agecli.recipes.signatures import Param, parameters

__all__ = ["STAGE_KINDS", "StageKind", "Param", "parameters", "Recipe", "Step", "load_recipe", "parse_recipe",
           "find_recipe", "bundled_recipes", "apply_override", "plan", "needs", "call_arguments",
           "describe_plan", "select_steps", "step_status", "run_recipe"]
