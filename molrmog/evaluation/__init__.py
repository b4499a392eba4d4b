"""Evaluation: the dataset's offline featurizer (`featurizer`), the metrics of a trained run (`evaluate`:
FID / KID / precision / recall, the memorisation baseline, Jacobian spectra, few-step sampling, the VAE round
trip) and the comparison of expert kinds (`compare`). Imports everything below it, nothing above.

`molrmog.evaluation` was one module before molrmog 0.3; its public names (`evaluate_run`, ...) are still
importable from here."""

from molrmog.evaluation.evaluate import *  # noqa: F401,F403
from molrmog.evaluation.evaluate import __all__  # noqa: F401
