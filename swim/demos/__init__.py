"""The demos, in one place: each trains tiny random models on synthetic data and reports its method's claim.

- `swim_demo`: SWIM's attention grounding, NTP only vs SWIM (``make demo``, ``make demo-seeds``);
- `klal_demo`: KLAL on an image task (``make demo-klal``);
- `seg_demo`: the segmentation head, Sa2VA baseline vs Mask-Biased Attention (``make demo-seg``);
- `build_demo`: NL-Refer construction offline (``make demo-build``);
- `common`: what they share (data arguments of a recipe, a run's evaluation, curves, mean ± std); `cli`: ``swim demo``.

Dependencies point one way: the demos use the library (``swim.data``, ``swim.eval``, ``swim.train``, ...), and
nothing in the library imports a demo.
"""
