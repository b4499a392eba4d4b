"""The image pipeline: datasets (`data`), a run's settings (`config`), a trained run as one object (`run`),
training a run (`stages`: clusters, VAEs, experts) and its report (`report`). Imports `core`, `training` and
`models`.

`molrmog.pipeline` was one module before molrmog 0.3; its public names (`train_run`, `sample_run`,
`prepare_run`, `load_config`, ...) are still importable from here."""

from molrmog.pipeline.stages import *  # noqa: F401,F403
from molrmog.pipeline.stages import __all__  # noqa: F401
