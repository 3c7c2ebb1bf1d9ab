"""Test setup: kernels run under Triton's interpreter on CPU; caches go to a temporary folder."""
import os
import tempfile

# Must be set before triton creates any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MIXFORGE_CACHE_DIR", tempfile.mkdtemp(prefix="mixforge-test-cache-"))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# `pytest` runs what CI runs (derandomized); HYPOTHESIS_PROFILE=dev or thorough explores new examples
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
