"""The one exception type lsq raises for bad input; the CLI prints it as a single line."""


class LsqError(ValueError):
    """Bad input or a refused operation. The message names the file, key or value at fault."""


class TrainingDiverged(LsqError):
    """Training ended with a non-finite loss: a result for a study, bad settings for a pipeline."""
