"""Decoding against KV caches: split-K (Flash-Decoding) attention and LSE merging."""

from fa2lab.decode.api import decode_attention, decode_plan
from fa2lab.decode.plan import DecodePlan
from fa2lab.decode.merge import merge_states, merge_states_stack
from fa2lab.decode.splitk import SplitPlan, UnifiedMaxStats, auto_num_splits, plan_splits

__all__ = ["decode_attention", "decode_plan", "DecodePlan", "merge_states", "merge_states_stack", "plan_splits", "auto_num_splits",
           "SplitPlan", "UnifiedMaxStats"]
