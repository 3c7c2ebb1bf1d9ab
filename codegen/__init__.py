"""codegen: Mixer -> KernelPlan -> printed Triton -> generated module -> ops."""
