"""Shared pytest configuration.

Hypothesis profiles: "ci" (the default) keeps every property test to ~200 examples with no per-example
deadline, so the suite stays fast and does not flake on a slow runner. For a long local fuzzing run set
SHARDMERGE_FUZZ_EXAMPLES, e.g. `SHARDMERGE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_headers.py
--hypothesis-show-statistics`; HYPOTHESIS_PROFILE picks a registered profile by name.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_examples = os.environ.get("SHARDMERGE_FUZZ_EXAMPLES", "").strip()
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=int(_examples or 20000))
settings.load_profile("long" if _examples else os.environ.get("HYPOTHESIS_PROFILE", "ci"))
