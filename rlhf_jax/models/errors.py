"""Errors raised while reading or writing model checkpoints."""


class ModelLoadError(ValueError):
    """A checkpoint directory, file, tensor or config does not match what the model expects.

    The message always names the file (and tensor or config key) and states what was expected vs found.
    """
