"""The project's exception types (the bottom of the package: imports nothing of molrmog).

- `MolrmogError` (a `ValueError`): a problem in what the user gave -- an option, a file, an input
  tensor. The message says what was wrong and what to do. The command line prints it as one line
  `molrmog: error: ...` and exits with 2; executors never retry it (it is deterministic).
- `ArtefactError`: a `MolrmogError` about a saved file or directory (damaged, of another class or
  format version); its message names the file.
- `NumericalError`: a `MolrmogError` from the closed-form maths (a capacitance matrix that is not
  positive definite): bad input when a user evaluates at too small a t, divergence when it happens
  to a model in training (`molrmog.training.train.fit` turns it into `TrainingDiverged`).
- `TrainingDiverged`: training stopped because the loss or the parameters stopped being finite or
  the loss exploded; the last good checkpoint is kept. Exit 1: not the user's input, not a bug.

Anything else that escapes is a bug: the command line shows the traceback and exits with 1.
"""

from __future__ import annotations

__all__ = ["MolrmogError", "ArtefactError", "NumericalError", "TrainingDiverged"]


class MolrmogError(ValueError):
    """Bad input: what was wrong, and what to do about it.

    `param` names the library parameter the message starts with ("cluster must lie in 0..9"): the library
    speaks of its parameters, and the command line translates the name into its flag ("--class must lie ...")."""

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param

    def __reduce__(self):  # raised in a worker process, it arrives with its param
        return _rebuild, (type(self), self.args, self.param)


def _rebuild(cls, args, param):
    return cls(*args, param=param)


class ArtefactError(MolrmogError):
    """A saved artefact cannot be used: damaged, unknown class, unknown format version, wrong shapes."""


class NumericalError(MolrmogError):
    """The closed-form maths broke down numerically (t too small for the dtype, or non-finite parameters)."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became non-finite, or the loss exploded; the last good checkpoint is kept."""
