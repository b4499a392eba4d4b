"""The theory experiments: name -> (function, help text, files written). The CLI builds `molrmog experiment NAME`."""

from __future__ import annotations

from molrmog.experiments.convergence import run_convergence
from molrmog.experiments.estimation import run_estimation
from molrmog.experiments.few_step import run_few_step
from molrmog.experiments.generalisation import run_generalisation
from molrmog.experiments.phase import run_phase

EXPERIMENTS = {
    "estimation": (run_estimation, "claim 1: score estimation error vs samples n, for several ambient D",
                   "estimation.csv/.json/.png"),
    "convergence": (run_convergence, "claim 2: linear convergence of gradient descent near the truth, "
                    "Hessian eigenvalues", "convergence.csv/.json/.png and hessian.png"),
    "phase-transition": (run_phase, "claim 3: MoLRG subspace recovery vs intrinsic dimension d and "
                         "samples N (DSM vs PCA / K-subspaces)", "phase_transition.csv/.json/.png"),
    "few-step": (run_few_step, "few-step sampling against the exact reverse step: exact, Gaussian steps with the "
                 "exact mean, PF-ODE with the exact score, learned vanilla and SMD MLPs, 1-64 steps",
                 "few_step.csv/.json/.png"),
    "generalisation": (run_generalisation, "from memorisation to generalisation as the training set grows: "
                       "memorised fraction, GL, reproducibility of disjoint halves, PF distance and score error vs N "
                       "on a synthetic MoLRG (mog, mlp) and, with --run, on a trained run's cluster (mog, unet)",
                       "generalisation.csv/.json/.png"),
}
