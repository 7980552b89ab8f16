"""Gates: generic hash gates for every asset, and the gate machinery."""

from llm_assets.checks.hash_gates import INPUT_CHAIN, INTEGRITY, build_hash_gates

__all__ = ["INPUT_CHAIN", "INTEGRITY", "build_hash_gates"]
