"""codegen: Mixer -> KernelPlan -> printed Triton -> generated module -> ops (see README.md).

Entry points: `ops.MixerOps` / `ops.compile` (what `mixforge.compile` returns), `plan.build_plan`,
`render.render_module`, and the path interface in `core` that `recurrent` and `chunk` implement.
"""
