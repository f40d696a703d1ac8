"""Benchmark drivers: each takes its cases as parameters and returns rows (dicts), which the
figure functions of fa2lab.viz draw. Nothing below the CLI, viz and notebooks imports them; the
measurement tools they use (timing, peak memory, the exactness rule) are in fa2lab.measure."""
