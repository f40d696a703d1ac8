"""The persistent one pass against the per-tile one at N=2048 (D=128, full, causal, GQA 32:8 causal) through the
public call, to place hopper_config.PERSISTENT_BWD_BELOW: `python experiments/persistent_bwd_2048_gpu.py OUT.jsonl`."""
import sys
from fa2lab.bench import hopper_bwd_gpu as H
from fa2lab.kernels import hopper_config
base = dict(hopper_config.BWD[128])
cfgs = {"one-pass s2": base, "persistent s2": dict(base, gluon_dkdvq=(64, 128, 2, "persistent"))}
items = [(case, label, cfg) for case in [(2048, 128, False), (2048, 128, True), (2048, 128, True, 32, 8)] for label, cfg in cfgs.items()]
H.warm(items, 0, 1)
with open(sys.argv[1], "w") as sink:
    rows = H.measure(items, sink)
print("\n".join(H.summary(rows)))
