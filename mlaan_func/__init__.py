"""mlaan_func: supervised local learning as pure functions."""
