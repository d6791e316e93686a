"""The one error of the `weights` package."""

from common.errors import UserError


class WeightsError(UserError):
    """Weights that cannot be found or read safely; str() is '<path or id>: <problem>' on one line."""
