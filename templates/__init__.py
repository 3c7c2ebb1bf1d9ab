"""Jinja2 templates of the generated Triton kernels (package data, rendered by mixforge.codegen.render)."""
