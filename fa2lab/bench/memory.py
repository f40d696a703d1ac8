"""Deprecated: moved to fa2lab.measure.memory (bench/ holds only benchmark drivers). This alias
goes in the next release."""

import warnings

from fa2lab.measure.memory import (TIMING_MMAP_THRESHOLD, EXACT_MMAP_THRESHOLD, configure_for_timing,  # noqa: F401
                                   peak_extra_bytes, peak_tensor_bytes, supported)

warnings.warn("fa2lab.bench.memory moved to fa2lab.measure.memory; import it from there", DeprecationWarning,
              stacklevel=2)
