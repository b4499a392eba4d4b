"""molrmog: diffusion on mixtures of low-rank subspaces with mixture-of-Gaussian latents.

The package is cut into layers, each a sub-package that imports only the ones below it (a test keeps it so):

    core          errors, registry, options, artefacts, outputs, mixture, schedules, distributions, samplers,
                  losses, metrics, em
    training      train, threads, executors
    models        experts, smd, vae, layouts, kinds
    pipeline      data, config, run, stages (training a run), report
    evaluation    featurizer, evaluate, compare
    applications  editing, watermark
    experiments   the theory experiments
    cli           the command line

The modules had flat names before molrmog 0.3 (`molrmog.distributions`, `molrmog.samplers`, `molrmog.kinds`,
...). Those names still import -- the same module objects, under their old names (`MOVED`) -- so code written
against them keeps working; new code should use the layered names.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

MOVED = {  # old flat module -> its place in the layers (molrmog.pipeline and molrmog.evaluation are packages now)
    "errors": "core.errors", "registry": "core.registry", "options": "core.options", "artefacts": "core.artefacts",
    "outputs": "core.outputs", "mixture": "core.mixture", "schedules": "core.schedules",
    "distributions": "core.distributions", "samplers": "core.samplers", "losses": "core.losses",
    "metrics": "core.metrics", "em": "core.em", "train": "training.train", "executors": "training.executors",
    "threads": "training.threads", "experts": "models.experts", "smd": "models.smd", "vae": "models.vae",
    "kinds": "models.kinds", "layouts": "models.layouts", "data": "pipeline.data", "config": "pipeline.config",
    "run": "pipeline.run", "report": "pipeline.report", "featurizer": "evaluation.featurizer",
    "compare": "evaluation.compare", "editing": "applications.editing", "watermark": "applications.watermark",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `molrmog.<old name>` as the module it became (the same object, not a copy)."""

    def find_spec(self, name, path=None, target=None):
        old = name.removeprefix("molrmog.")
        if name.startswith("molrmog.") and old in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("molrmog." + MOVED[spec.name.removeprefix("molrmog.")])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.insert(0, _Moved())
