"""`molrmog experiment NAME`: the theory experiments as CLI subcommands."""

from __future__ import annotations

import json

from .convergence import run_convergence
from .estimation import run_estimation
from .phase import run_phase

EXPERIMENTS = {
    "estimation": (run_estimation, "claim 1: score estimation error vs samples n, for several ambient D",
                   "estimation.csv/.json/.png"),
    "convergence": (run_convergence, "claim 2: linear convergence of gradient descent near the truth, "
                    "Hessian eigenvalues", "convergence.csv/.json/.png and hessian.png"),
    "phase-transition": (run_phase, "claim 3: MoLRG subspace recovery vs intrinsic dimension d and "
                         "samples N (DSM vs PCA / K-subspaces)", "phase_transition.csv/.json/.png"),
}


def add_experiment_parsers(sub) -> None:
    from ..cli import add_executor_options

    p = sub.add_parser("experiment",
                       help="run a theory experiment (estimation, convergence, phase-transition)",
                       description="Run one of the experiments that check the theory claims; each writes "
                       "CSV + JSON numbers and PNG figures into --out.")
    esub = p.add_subparsers(dest="experiment", metavar="NAME", required=True)
    for name, (_, helptext, files) in EXPERIMENTS.items():
        e = esub.add_parser(name, help=helptext, description=f"{helptext}. Writes {files}.")
        e.add_argument("--quick", action="store_true", help="small preset (under a minute on 2 CPU cores)")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--out", default=f"runs/{name}", help=f"output directory (default runs/{name})")
        e.add_argument("--no-progress", action="store_true", help="hide progress bars")
        add_executor_options(e)
        e.set_defaults(func=_cmd_experiment, experiment_name=name)


def _cmd_experiment(a) -> int:
    from ..cli import executor_from

    fn = EXPERIMENTS[a.experiment_name][0]
    res = fn(a.out, preset="quick" if a.quick else "default", seed=a.seed, progress=not a.no_progress,
             executor=executor_from(a))
    res = {k: v for k, v in res.items() if k != "config"}
    text = json.dumps(res, indent=2)
    print(text if len(text) < 3000 else text[:3000] + "\n...")
    print(f"wrote results into {a.out}")
    return 0
