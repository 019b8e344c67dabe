"""The phases `xcstack.platform.plan.derive_plan` runs, one module per concern.

`cores` (how many cores, in which order), `workers` (I/O vs compute, worker counts, pinning), `runtime`
(event loop, JSON, onnxruntime options) and `advice` (kernel limits), each appending what it decided to
one shared `Findings`, in the order the plan reports them. `overrides` turns config into their inputs.
"""
