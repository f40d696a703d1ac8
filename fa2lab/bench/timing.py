"""Deprecated: moved to fa2lab.measure.timing (bench/ holds only benchmark drivers). This alias
goes in the next release."""

import warnings

from fa2lab.measure.timing import median_seconds  # noqa: F401

warnings.warn("fa2lab.bench.timing moved to fa2lab.measure.timing; import it from there", DeprecationWarning,
              stacklevel=2)
