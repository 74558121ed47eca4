"""Error types the zoo raises on purpose, so callers can tell a documented limit from a bug."""


class UnsupportedError(NotImplementedError):
    """A generic call (timm, torch.jit, a data config) that a model does not support.

    The message says what was asked, why this model cannot do it, and what to use instead.
    """
