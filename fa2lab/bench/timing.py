"""Deprecated: moved to fa2lab.measure.timing (bench/ holds only benchmark drivers). This alias
goes in the next release."""

import warnings

from fa2lab.measure.timing import *  # noqa: F401,F403 - every public name of the new home

warnings.warn("fa2lab.bench.timing moved to fa2lab.measure.timing; import it from there", DeprecationWarning,
              stacklevel=2)
