"""Attention-supervision overhead benchmark (implementation: `swim/bench/overhead.py`).

python benchmarks/attention_overhead.py [--lengths 1024 2048 4096] [--repeats 3] [--json out.json]
"""

from swim.bench.overhead import main

if __name__ == "__main__":
    main()
